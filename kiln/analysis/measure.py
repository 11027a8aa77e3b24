"""Measured per-op time on this CPU with torch.profiler, aligned with the graph's nodes.

The captured program runs under an FX Interpreter that wraps each op in a profiler
record_function named after its node, so every measured time belongs to exactly one node
and sits beside that node's roofline. The eager model is timed too, so the user sees how
much of its wall time the ops account for (the rest is Python and dispatch overhead).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from kiln.graph.graph import Graph
from kiln.models.loaded import LoadedModel

PREFIX = "kiln::"


@dataclass(frozen=True)
class MeasuredRecord:
    per_node_s: dict[str, float]   # mean seconds per run of each op node
    ops_s: float                   # their sum
    eager_s: float                 # median wall time of the eager model
    threads: int
    repeats: int


class _Recorder(torch.fx.Interpreter):
    def run_node(self, n: torch.fx.Node):
        if n.op != "call_function":
            return super().run_node(n)
        with record_function(PREFIX + n.name):
            return super().run_node(n)


def measure(graph: Graph, loaded: LoadedModel, repeats: int = 5, warmup: int = 2) -> MeasuredRecord:
    program = graph.program
    flat = program._graph_module_flat_inputs(tuple(loaded.example_inputs), dict(loaded.example_kwargs))
    interp = _Recorder(program.graph_module)
    with torch.no_grad():
        for _ in range(warmup):
            interp.run(*flat)
        with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                interp.run(*flat)
    per_node = {}
    for ev in prof.key_averages():
        if ev.key.startswith(PREFIX):
            per_node[ev.key[len(PREFIX):]] = ev.cpu_time_total / 1e6 / repeats
    return MeasuredRecord(per_node, sum(per_node.values()), _eager_seconds(loaded, repeats, warmup),
                          torch.get_num_threads(), repeats)


@contextlib.contextmanager
def _quiet_native_stderr():
    """Kineto prints profiler start/stop lines from C++ straight to fd 2; keep them out."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _eager_seconds(loaded: LoadedModel, repeats: int, warmup: int) -> float:
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            loaded.model(*loaded.example_inputs, **loaded.example_kwargs)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)

"""Measured per-op time on this CPU, aligned with the graph's nodes, through kiln.timing.

The captured program runs once under an FX Interpreter that keeps, for every op node, a call
of its ATen op on the concrete arguments it received. kiln.timing then times those calls in
graph order, one graph pass per round, so every measured time belongs to exactly one node and
sits beside that node's roofline. No profiler is involved: torch.profiler's record_function
per node cost more than the ops themselves (zoo:resnet20 read 283 ms of "graph ops" against a
14 ms eager forward, its 885 kFLOP stem conv 22 ms). The eager model and the exported graph
module are timed whole in the same interleaved rounds, so the per-op sum can be checked against
the graph's own time (the rest of eager's time is Python and module dispatch).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kiln import timing
from kiln.graph.graph import Graph
from kiln.models.loaded import LoadedModel


@dataclass(frozen=True)
class MeasuredRecord:
    per_node_s: dict[str, float]   # median seconds of each op node, timed on its own arguments
    ops_s: float                   # their sum
    ops_min_s: float               # the sum of each op's fastest call (the quiet machine's figure)
    eager_s: float                 # median wall time of the eager model
    graph_s: float                 # median wall time of the exported graph module
    threads: int
    repeats: int
    eager: dict                    # kiln.timing's Timing.to_dict() of each whole-model figure
    graph: dict
    contended_ops: int             # op nodes whose own samples were contended
    note: str                      # kiln.timing's note on the whole-model figures ('' when clean)

    @property
    def ops_share(self) -> float:
        """The per-op sum over the graph's whole time (1.0: they agree)."""
        return self.ops_s / self.graph_s


class _Collect(torch.fx.Interpreter):
    """Runs the graph once, keeping each op node's call on the arguments it received."""

    def __init__(self, module: torch.fx.GraphModule):
        super().__init__(module)
        self.calls: dict[str, functools.partial] = {}

    def run_node(self, n: torch.fx.Node):
        if n.op == "call_function":
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            schema = getattr(n.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                # an in-place op (scatter_add_ into a fresh buffer) repeated for timing must not
                # change the tensors the real run hands to later ops, or the user's inputs
                args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs))
            self.calls[n.name] = functools.partial(n.target, *args, **kwargs)
        return super().run_node(n)


EAGER, GRAPH = "eager model", "graph module"    # node names have no spaces: no clash


def measure(graph: Graph, loaded: LoadedModel, repeats: int = 5, warmup: int = 2) -> MeasuredRecord:
    program = graph.program
    flat = program._graph_module_flat_inputs(tuple(loaded.example_inputs), dict(loaded.example_kwargs))
    collect = _Collect(program.graph_module)
    with torch.no_grad():
        collect.run(*flat)
    module = program.module()
    calls = collect.calls | {GRAPH: lambda: module(*loaded.example_inputs, **loaded.example_kwargs),
                             EAGER: loaded.run}
    # one round: every op in graph order, then the graph module, then eager; no untimed call
    # between ops, as in a real run, and the whole figures interleaved with the per-op ones
    m = timing.measure(calls, timing.TimingConfig(rounds=repeats, warmup=warmup, short_call_s=0.0, rotate=False))
    per_node = {k: m[k].median for k in collect.calls}
    return MeasuredRecord(per_node, sum(per_node.values()), sum(m[k].min for k in collect.calls), m[EAGER].median, m[GRAPH].median, m.threads, m.rounds,
                          m[EAGER].to_dict(), m[GRAPH].to_dict(), sum(k in collect.calls for k in m.contended),
                          m.note())

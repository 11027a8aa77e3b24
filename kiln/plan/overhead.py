"""Framework overhead per step of kiln's parallel engines, measured on one process.

A parallel mode costs more than its FLOPs and its collectives: FSDP2's hooks gather, reshard
and copy each unit's parameters and gradients through DTensors, tensor parallelism dispatches
every sharded op through DTensor, ZeroRedundancyOptimizer wraps the optimizer. That cost is
paid per step and per op, not per sample, and no roofline or alpha-beta term holds it. It is
measured here the way the compute efficiency is (kiln.plan.plans.calibrated_efficiency): on
one device, with nothing of a multi-device run in it. Each engine runs on a process group of
one process (its collectives are local copies) at the batch one of its ranks sees, interleaved
in rounds with the plain DDP engine on the same batch, and its overhead is the difference of
the two medians. The clock is the process's CPU time: one single-threaded process with no
peer to wait for spends its wall time on the CPU, and CPU time survives a shared machine that
wall time does not (zoo:gpt at batch 32: 0.20-0.22 s of CPU per step under a load average of
25 on 2 cores, 0.21 s wall on the quiet machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kiln.errors import KilnError
from kiln.models.spec import load
from kiln.timing import TimingConfig, measure
from kiln.train.config import TrainConfig
from kiln.train.distributed import torchrun_command
from kiln.train.parallel.config import Mode, ParallelConfig
from kiln.train.parallel.registry import make_engine

REFERENCE = "ddp"          # the engine whose 1-process step the efficiency calibration measured


def _scalar(out):
    """A loss from any model output: the mean square of the first tensor in it."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = next(iter(out.values()))
    return out.float().pow(2).mean()


def rank_main(spec: str, batches: dict[str, int], rounds: int, out: str) -> None:
    """One process of world size 1: time each mode's engine step (forward, backward, optimizer)
    at its batch beside the reference engine at the same batch; write the medians (s)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        loaded = load(spec)
        calls, skipped = {}, {}
        for mode, b in sorted(batches.items()) + [(REFERENCE, b) for b in sorted(set(batches.values()))]:
            name = f"{mode}@{b}"
            if name in calls:
                continue
            inputs = tuple(torch.cat([t] * b) for t in loaded.example_inputs)
            try:
                torch.manual_seed(0)
                engine = make_engine(ParallelConfig(modes=(Mode(mode),)))
                model, opt = engine.prepare(load(spec).model.train(), TrainConfig(model=spec, batch_size=b))
            except Exception as exc:    # a mode this model cannot run on one process: say which
                skipped[name] = f"{type(exc).__name__}: {exc}"
                continue

            def step(engine=engine, model=model, opt=opt, inputs=inputs):
                with torch.enable_grad():
                    opt.zero_grad(set_to_none=True)
                    engine.step(model, lambda m, x, y: _scalar(m(*x)), inputs, None)
                    opt.step()
            calls[name] = step
        m = measure(calls, TimingConfig(rounds=rounds, warmup=2, short_call_s=0.0, remeasure=False),
                    clock=time.process_time)
        Path(out).write_text(json.dumps({"median_s": {k: t.median for k, t in m.timings.items()},
                                         "min_s": {k: t.min for k, t in m.timings.items()},
                                         "skipped": skipped, "note": m.note()}))
    finally:
        dist.destroy_process_group()


def engine_overheads(spec: str, batches: dict[str, int], rounds: int = 10) -> dict:
    """{"overhead_s": {mode: s per step beyond the reference engine at that mode's batch}, and
    the raw medians}, measured on one process under torchrun (kiln's one launcher)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "overheads.json"
        cmd = torchrun_command(1) + ["-m", "kiln.plan.overhead", "--spec", spec, "--out", str(out),
                                     "--rounds", str(rounds), "--batches", json.dumps(batches)]
        done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if done.returncode or not out.is_file():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise KilnError(f"measuring the engines' overhead on {spec} failed: {tail}")
        raw = json.loads(out.read_text())
    med = raw["median_s"]
    overhead = {mode: max(0.0, med[f"{mode}@{b}"] - med[f"{REFERENCE}@{b}"])
                for mode, b in batches.items() if f"{mode}@{b}" in med}
    return {"overhead_s": overhead, "reference": REFERENCE, "clock": "process CPU time, 1 thread, world size 1"} | raw


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batches", required=True, help='JSON {"mode": batch per rank}')
    args = parser.parse_args()
    rank_main(args.spec, json.loads(args.batches), args.rounds, args.out)
    sys.exit(0)

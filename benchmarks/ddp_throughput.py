"""Data-parallel training on this machine: 2 DDP processes (gloo, 1 thread each) beside 1
process (2 threads), same model, data and global batch, plus the all-reduce time per step
that explains the gap.

    .venv/bin/python benchmarks/ddp_throughput.py [--model zoo:cnn] [--steps 60] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import date

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import report  # noqa: E402

from kiln.models.spec import load  # noqa: E402
from kiln.train.config import TrainConfig  # noqa: E402
from kiln.train.distributed import launch  # noqa: E402
from kiln.train.trainer import default_dataset, fit  # noqa: E402


def _allreduce_worker(rank: int, world: int, numel: int, repeats: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    grad = torch.randn(numel)
    times = []
    for i in range(repeats + 3):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(grad)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(statistics.median(times))
    dist.destroy_process_group()


def allreduce_seconds(numel: int, repeats: int = 30) -> float:
    """Median time of one all-reduce of the model's gradient (one flat fp32 tensor) on 2 ranks."""
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_allreduce_worker, args=(2, numel, repeats, 29517, queue), nprocs=2, join=True)
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:cnn")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args()
    dataset = default_dataset(args.model)
    base = dict(model=args.model, dataset=dataset, epochs=1, max_steps=args.steps, batch_size=args.batch,
                schedule="constant")
    with tempfile.TemporaryDirectory() as tmp:
        one = fit(TrainConfig(**base, out=f"{tmp}/one", threads=2), progress=False)
        assert launch(TrainConfig(**base, out=f"{tmp}/two", threads=1), nproc=2) == 0
        two = json.load(open(f"{tmp}/two/metrics.json"))
    numel = sum(p.numel() for p in load(args.model).model.parameters())
    ar = allreduce_seconds(numel)
    steps = one["steps"]
    result = {
        "date": date.today().isoformat(), "model": args.model, "dataset": dataset, "global_batch": args.batch,
        "steps": steps, "params": numel,
        "one_process_2_threads_samples_s": one["throughput_samples_s"],
        "two_processes_1_thread_samples_s": two["throughput_samples_s"],
        "ratio_two_over_one": two["throughput_samples_s"] / one["throughput_samples_s"],
        "step_s_one": one["train_time_s"] / steps, "step_s_two": two["train_time_s"] / steps,
        "allreduce_s_per_step": ar, "allreduce_share_of_two_proc_step": ar / (two["train_time_s"] / steps),
    }
    report(result, args.json)


if __name__ == "__main__":
    main()

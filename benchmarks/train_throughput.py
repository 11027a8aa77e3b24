"""Training throughput of kiln's trainer beside a plain hand-written PyTorch loop, same model,
data, batch, optimizer and number of steps, measured alternately in one run.

    .venv/bin/python benchmarks/train_throughput.py [--models zoo:cnn,zoo:minilm_cls] [--steps 60] [--json PATH]
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
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kiln.data import load_dataset  # noqa: E402
from kiln.models.spec import load  # noqa: E402
from kiln.train.config import TrainConfig  # noqa: E402
from kiln.train.trainer import default_dataset, fit  # noqa: E402

BATCH = {"zoo:cnn": 64, "zoo:minilm_cls": 32}


def plain_loop(spec: str, dataset: str, batch: int, steps: int) -> float:
    """The loop a user would write by hand; returns samples/s over `steps` optimizer steps."""
    model = load(spec).model.train()
    data = load_dataset(dataset).train
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    done, seen, t0 = 0, 0, time.perf_counter()
    while done < steps:
        for x, y in loader:
            logits = model(**x) if isinstance(x, dict) else model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done, seen = done + 1, seen + y.shape[0]
            if done == steps:
                break
    return seen / (time.perf_counter() - t0)


def kiln_loop(spec: str, dataset: str, batch: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(model=spec, dataset=dataset, out=f"{tmp}/run", epochs=1, max_steps=steps,
                          batch_size=batch, lr=1e-4, schedule="constant", weight_decay=0.01)
        return fit(cfg, progress=False)["history"][0]["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="zoo:cnn,zoo:minilm_cls")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {"date": date.today().isoformat(), "threads": 2, "steps": args.steps, "models": {}}
    for spec in args.models.split(","):
        dataset, batch = default_dataset(spec), BATCH.get(spec, 64)
        kiln_runs, plain_runs = [], []
        for _ in range(args.repeats):   # alternate so drift hits both equally
            plain_runs.append(plain_loop(spec, dataset, batch, args.steps))
            kiln_runs.append(kiln_loop(spec, dataset, batch, args.steps))
        k, p = statistics.median(kiln_runs), statistics.median(plain_runs)
        results["models"][spec] = {"dataset": dataset, "batch": batch, "kiln_samples_s": k, "plain_samples_s": p,
                                   "ratio": k / p, "kiln_runs": kiln_runs, "plain_runs": plain_runs}
        print(f"{spec} on {dataset}, batch {batch}: kiln {k:.1f} samples/s, plain loop {p:.1f}, ratio {k / p:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

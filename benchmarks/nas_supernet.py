"""How well a SPOS supernet ranks architectures: Kendall tau between the accuracy each path gets with
inherited supernet weights and its accuracy when trained stand-alone, on real MNIST.

    flock /tmp/kiln-cpu.lock .venv/bin/python benchmarks/nas_supernet.py [--archs 16] [--json PATH]

The supernet (configs/nas/spos_mnist.toml: 4 layers x {3x3, 5x5, 7x7 conv, identity}, 16
channels) is trained with uniform single paths; `--archs` distinct paths are drawn uniformly at
random; each is scored on the 999 validation digits with inherited weights (BN recalibrated on
`bn_batches` training batches), and trained from scratch with one fixed recipe (`--standalone-epochs`,
same seed for all) and scored on the same digits. Default JSON: benchmarks/results/nas_supernet.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import merge_result  # noqa: E402
from kiln.search.nas import fit, spos  # noqa: E402
from kiln.search.nas.run import load_config, train_supernet  # noqa: E402

CONFIG = Path("configs/nas/spos_mnist.toml")


def sample_paths(space, n: int, seed: int) -> list[tuple[int, ...]]:
    total = len(space.blocks) ** space.layers
    if n > total:
        sys.exit(f"--archs {n} is more than the {total} paths in the space")
    rng, paths = random.Random(seed), []
    while len(paths) < n:
        path = tuple(rng.randrange(len(space.blocks)) for _ in range(space.layers))
        if path not in paths:
            paths.append(path)
    return paths


def standalone(cfg, data: fit.Data, path, recipe: fit.Recipe) -> tuple[float, float, float]:
    torch.manual_seed(cfg.seed)
    net = spos.PathNet(cfg.space, path, data.in_channels, data.num_classes)
    stats = fit.train(net, data.train, recipe, cfg.seed)
    return fit.accuracy(net, data.val), fit.accuracy(net, data.test), stats["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", type=int, default=16)
    parser.add_argument("--standalone-epochs", type=float, default=3.0)
    parser.add_argument("--supernet-epochs", type=float, default=None, help="default: the config's")
    parser.add_argument("--json", default="benchmarks/results/nas_supernet.json")
    args = parser.parse_args()
    # One thread: on the shared 2-core machine a second OpenMP thread that gets descheduled stalls
    # every one of the thousands of small kernels per step (measured: 1.1 s/step at 1 thread,
    # 2 to 80 s/step at 2 threads under load).
    torch.set_num_threads(1)
    from scipy.stats import kendalltau

    cfg = load_config("spos", CONFIG)
    if args.supernet_epochs:
        cfg = dataclasses.replace(cfg, supernet=dataclasses.replace(cfg.supernet, epochs=args.supernet_epochs))
    data = fit.load_data(cfg.dataset, cfg.seed)
    start = time.perf_counter()
    supernet, stats = train_supernet(cfg, data)
    recipe = fit.Recipe(epochs=args.standalone_epochs, batch_size=cfg.retrain.batch_size, lr=cfg.retrain.lr)
    rows = []
    for k, path in enumerate(sample_paths(cfg.space, args.archs, cfg.seed + 1)):
        inherited = spos.inherited_accuracy(supernet, path, data.train, data.val, cfg.search.bn_batches, cfg.seed)
        val, test, seconds = standalone(cfg, data, path, recipe)
        rows.append({"path": spos.describe(cfg.space, path), "inherited_val_accuracy": inherited,
                     "standalone_val_accuracy": val, "standalone_test_accuracy": test,
                     "standalone_seconds": round(seconds, 1)})
        print(f"{k + 1:2d}/{args.archs} {' '.join(rows[-1]['path']):40s} inherited {inherited:.4f}  "
              f"stand-alone {val:.4f}", flush=True)
    a = [r["inherited_val_accuracy"] for r in rows]
    b = [r["standalone_val_accuracy"] for r in rows]
    tau = spos.kendall_tau(a, b)
    ref = kendalltau(a, b)
    entry = {"date": date.today().isoformat(), "command": " ".join(["benchmarks/nas_supernet.py", *sys.argv[1:]]),
             "config": str(CONFIG), "threads": torch.get_num_threads(), "archs": len(rows),
             "kendall_tau": tau, "scipy_kendall_tau_b": float(ref.statistic), "p_value": float(ref.pvalue),
             "supernet_seconds": round(stats["seconds"], 1), "supernet_steps": stats["steps"],
             "standalone_epochs": args.standalone_epochs, "val_samples": len(data.val),
             "wall_seconds": round(time.perf_counter() - start, 1), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    merge_result(args.json, "spos_mnist", entry)
    print(f"\nKendall tau (inherited vs stand-alone, {len(rows)} paths, 999 val digits): {tau:.3f} "
          f"(scipy tau-b {ref.statistic:.3f}, p={ref.pvalue:.3g}); supernet {stats['seconds']:.0f} s, "
          f"total {entry['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()

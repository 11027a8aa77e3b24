"""The low-rank figures: a real `kiln lowrank` run (kiln.lowrank.run) per experiment.

    flock /tmp/kiln-cpu.lock .venv/bin/python benchmarks/lowrank_figures.py EXP [EXP ...] [--json PATH]

EXP:
  minilm   MiniLM fine-tuned on Rotten Tomatoes (runs/figures/minilm-v3): every Linear but the
           classifier to half its weights by truncated SVD (configs/lowrank/minilm_half.toml),
           a short distilled fine-tune; latency at batch 32 x 64 tokens, dense and low-rank
           side by side in one process; test accuracy before and after fine-tuning
  cnn      zoo:cnn on MNIST (runs/figures/cnn): Tucker-2/SVD at 90% energy, one epoch of fine-tuning
A dense run that is missing is trained first with benchmarks/train_figures.py's recipe.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import merge_result  # noqa: E402
from kiln.lowrank.config import parse_config  # noqa: E402
from kiln.lowrank.run import lowrank_run  # noqa: E402
from kiln.config import read_toml  # noqa: E402

EXPERIMENTS = {
    "minilm": ("runs/figures/minilm-v3", "configs/lowrank/minilm_half.toml", "runs/figures/minilm-lowrank"),
    "cnn": ("runs/figures/cnn", "configs/lowrank/cnn_energy.toml", "runs/figures/cnn-lowrank"),
}
RECIPES = {"runs/figures/minilm-v3": "minilm", "runs/figures/cnn": "cnn"}


def ensure_dense(run: str) -> None:
    """Train the dense model with the recorded recipe when its run directory is missing."""
    if (Path(run) / "model.safetensors").is_file():
        return
    from train_figures import EXPERIMENTS as RECIPE  # noqa: E402

    from kiln.train.config import TrainConfig
    from kiln.train.trainer import fit

    print(f"{run} is missing: training it with benchmarks/train_figures.py's {RECIPES[run]} recipe", file=sys.stderr)
    fit(TrainConfig(**RECIPE[RECIPES[run]], out=run), progress=sys.stderr.isatty())


def experiment(name: str) -> dict:
    src, config, out = EXPERIMENTS[name]
    ensure_dense(src)
    if Path(out).exists():
        shutil.rmtree(out)          # this script's own run directory from an earlier run
    t0 = time.perf_counter()
    result = lowrank_run(src, parse_config(read_toml(config), config),
                         Path(out), log=lambda s: print(s, file=sys.stderr))
    rep, m = result["report"], result["metrics"]
    key, lat = m["metric"], rep["latency"]
    entry = {
        "date": date.today().isoformat(), "src": src, "config": config, "run": out,
        "command": f"flock /tmp/kiln-cpu.lock .venv/bin/python benchmarks/lowrank_figures.py {name}",
        "params_before": rep["params_before"], "params_after": rep["params_after"],
        "factorized_params_before": sum(r["params_before"] for r in rep["layers"] if r["ranks"]),
        "factorized_params_after": sum(r["params_after"] for r in rep["layers"] if r["ranks"]),
        "flops_before": rep["flops_before"], "flops_after": rep["flops_after"],
        "latency": lat, "finetune": m.get("finetune"),
        f"dense_{key}": m["before"], f"factorized_{key}": m["after"],
        f"finetuned_{key}": m.get("after_finetune"), "split": "test", "wall_s": time.perf_counter() - t0,
        "ranks": {r["fqn"]: r["ranks"] for r in rep["layers"] if r["ranks"]},
    }
    print(f"\n{name}: Linear/Conv weights {entry['factorized_params_before']:,} -> {entry['factorized_params_after']:,} "
          f"({entry['factorized_params_after'] / entry['factorized_params_before']:.1%}); model "
          f"{entry['params_before']:,} -> {entry['params_after']:,}; FLOPs/sample {entry['flops_before']:,} -> {entry['flops_after']:,}")
    print(f"latency at batch {lat['batch']} ({lat['threads']} threads, median of {lat['repeats']}, interleaved): "
          f"dense {lat['dense_s'] * 1e3:.1f} ms, low-rank {lat['lowrank_s'] * 1e3:.1f} ms -> {lat['speedup']:.2f}x")
    ft = m.get("finetune") or {}
    print(f"test {key}: dense {m['before']:.4f}, factorised {m['after']:.4f}, "
          f"fine-tuned {m.get('after_finetune', float('nan')):.4f} ({ft.get('steps', 0)} steps)")
    return entry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("experiments", nargs="+", choices=sorted(EXPERIMENTS))
    ap.add_argument("--json", default="benchmarks/results/lowrank_figures.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.experiments:
        merge_result(args.json, name, experiment(name))


if __name__ == "__main__":
    main()

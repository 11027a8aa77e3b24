"""Unstructured and N:M pruning figures; each experiment is a real prune run (kiln.prune.run,
what `kiln prune` calls) writing its artifact under runs/prune/.

    flock /tmp/kiln-cpu.lock .venv/bin/python benchmarks/prune_figures.py EXP [EXP ...] [--json PATH]

EXP:
  cnn90    zoo:cnn trained on real MNIST (runs/figures/cnn): 90% global magnitude sparsity,
           one-shot then fine-tuned with distillation from the dense model, and AGP (cubic
           ramp during the same fine-tune); test accuracy against the dense model's
  sweep    the same CNN: sparsity 0.1 to 0.9, random against L1 (magnitude), global scope,
           accuracy right after pruning and after one epoch of fine-tuning; table and plot
           (benchmarks/results/figures/prune_sweep.png)
  minilm24 MiniLM fine-tuned on Rotten Tomatoes (runs/figures/minilm-v3): 2:4 sparsity on every
           Linear of the encoder and pooler (the classifier head kept dense), a short fine-tune with
           distillation from the dense model; test accuracy before and after
The dense runs come from benchmarks/train_figures.py (cnn, minilm); they are trained here
with that recipe when missing. The MNIST split here has 500 test images: one image is 0.2 points.
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
from kiln.prune.config import parse_config  # noqa: E402
from kiln.prune.run import prune_run  # noqa: E402

OUT = Path("runs/prune")
THREADS = 2
CNN_RUN = Path("runs/figures/cnn")
MINILM_RUN = Path("runs/figures/minilm-v3")
CNN_FT = {"epochs": 8, "lr": 1e-3, "batch_size": 64, "warmup_fraction": 0.05, "weight_decay": 0.0, "distill": True,
          "threads": THREADS}
SWEEP_FT = {"epochs": 1, "lr": 1e-3, "batch_size": 64, "weight_decay": 0.0, "threads": THREADS}
MINILM_FT = {"epochs": 1, "max_steps": 120, "lr": 5e-5, "batch_size": 16, "warmup_fraction": 0.1,
             "weight_decay": 0.01, "grad_clip": 1.0, "distill": True, "threads": THREADS}


def need(run: Path, name: str) -> None:
    """Train the dense model with train_figures.py's recipe when it is not on disk."""
    if (run / "model.safetensors").is_file():
        return
    import train_figures

    print(f"{run} is missing: training it with benchmarks/train_figures.py {name}")
    train_figures.run(name, run.parent)
    if name == "minilm" and not (run / "model.safetensors").is_file():   # the recipe writes runs/figures/minilm
        shutil.move(str(run.parent / "minilm"), str(run))


def prune(src: Path, name: str, table: dict) -> dict:
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    result = prune_run(str(src), parse_config(table, name), out, progress=sys.stderr.isatty())
    m, r = result["metrics"], result["report"]
    key = m["metric"]
    zeros = sum(x["zeros"] for x in r["layers"])
    total = sum(x["total"] for x in r["layers"])
    return {"dense": m["before"], "pruned": m["after"], "final": m.get("after_finetune", m["after"]),
            "metric": key, "split": m["split"], "sparsity_of_pruned_layers": zeros / total,
            "nonzero_params": r["after"]["nonzero_params"], "params": r["after"]["params"],
            "flops": r["after"]["flops"], "effective_flops": r["after"]["effective_flops"],
            "finetune_steps": m.get("finetune", {}).get("steps"), "wall_s": time.perf_counter() - t0,
            "run": str(out), "config": table}


def cnn90() -> dict:
    need(CNN_RUN, "cnn")
    base = {"method": "unstructured", "criterion": "magnitude", "scope": "global", "ratio": 0.9, "finetune": CNN_FT}
    rows = {"oneshot": prune(CNN_RUN, "cnn90-oneshot", base),
            "agp": prune(CNN_RUN, "cnn90-agp", base | {"schedule": "agp", "agp_end": 0.6, "agp_every": 10})}
    print(f"{'schedule':10} {'sparsity':>9} {'dense':>7} {'pruned':>7} {'final':>7} {'gap':>7}")
    for k, v in rows.items():
        pruned = "-" if v["pruned"] is None else f"{v['pruned']:.4f}"
        print(f"{k:10} {v['sparsity_of_pruned_layers']:9.4f} {v['dense']:7.4f} {pruned:>7} {v['final']:7.4f} "
              f"{(v['final'] - v['dense']) * 100:+6.2f}")
    return rows


def sweep() -> dict:
    need(CNN_RUN, "cnn")
    ratios = [round(0.1 * i, 1) for i in range(1, 10)]
    rows = []
    for criterion in ("magnitude", "random"):
        for ratio in ratios:
            table = {"criterion": criterion, "scope": "global", "ratio": ratio, "finetune": SWEEP_FT}
            r = prune(CNN_RUN, f"sweep-{criterion}-{ratio}", table)
            rows.append({"criterion": criterion, "ratio": ratio, "pruned": r["pruned"], "finetuned": r["final"],
                         "dense": r["dense"], "sparsity_of_pruned_layers": r["sparsity_of_pruned_layers"]})
            print(f"{criterion:9} {ratio:4.1f}  pruned {r['pruned']:.4f}  fine-tuned {r['final']:.4f}", flush=True)
    print(f"\n{'ratio':>5} {'L1':>7} {'random':>7} {'L1+ft':>7} {'rand+ft':>7}")
    for ratio in ratios:
        mag = next(r for r in rows if r["criterion"] == "magnitude" and r["ratio"] == ratio)
        rnd = next(r for r in rows if r["criterion"] == "random" and r["ratio"] == ratio)
        print(f"{ratio:5.1f} {mag['pruned']:7.4f} {rnd['pruned']:7.4f} {mag['finetuned']:7.4f} {rnd['finetuned']:7.4f}")
    plot(rows, Path("benchmarks/results/figures/prune_sweep.png"))
    return {"rows": rows, "plot": "benchmarks/results/figures/prune_sweep.png"}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    styles = {"magnitude": ("L1 (magnitude)", "tab:blue"), "random": ("random", "tab:red")}
    for criterion, (label, color) in styles.items():
        rs = [r for r in rows if r["criterion"] == criterion]
        ax.plot([r["ratio"] for r in rs], [100 * r["pruned"] for r in rs], "o--", color=color, label=f"{label}, no fine-tune")
        ax.plot([r["ratio"] for r in rs], [100 * r["finetuned"] for r in rs], "o-", color=color,
                label=f"{label}, 1 epoch fine-tune")
    ax.axhline(100 * rows[0]["dense"], color="gray", lw=1, label="dense")
    ax.set_xlabel("global sparsity (fraction of Linear/Conv weights zeroed)")
    ax.set_ylabel("MNIST test accuracy (%)")
    ax.set_title("zoo:cnn on MNIST: random vs L1 unstructured pruning")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def minilm24() -> dict:
    need(MINILM_RUN, "minilm")
    table = {"method": "nm", "n": 2, "m": 4, "rules": [{"match": "fqn:head", "skip": True}],
             "finetune": MINILM_FT}
    r = prune(MINILM_RUN, "minilm-2of4", table)
    print(f"MiniLM 2:4 ({r['sparsity_of_pruned_layers']:.4f} of pruned layers zero): dense {r['dense']:.4f}  "
          f"2:4 {r['pruned']:.4f}  fine-tuned ({r['finetune_steps']} steps) {r['final']:.4f}")
    return r


EXPERIMENTS = {"cnn90": cnn90, "sweep": sweep, "minilm24": minilm24}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", choices=sorted(EXPERIMENTS))
    parser.add_argument("--json", default="benchmarks/results/prune_figures.json")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    for name in args.experiments:
        entry = EXPERIMENTS[name]()
        entry = {"result": entry, "date": date.today().isoformat(), "threads": THREADS}
        merge_result(args.json, name, entry)


if __name__ == "__main__":
    main()

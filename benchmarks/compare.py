"""The full `kiln compare` matrix on the zoo (issue 18, part 1): every optimisation on every
model, on every hardware profile, through `kiln compare` itself, and the wall time it took.

    python benchmarks/compare.py [--json benchmarks/results/compare.json] [--out runs/compare]
        [--models zoo:cnn,...] [--optimizations ...] [--backend auto] [--resume]

Writes the command's own compare.json (every cell) plus the command line, the date, the wall
time, the machine's load and which subset ran, keeping earlier runs' summaries as history.
Latencies need a quiet machine: each cell's timing note says whether this one was.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import write_with_history  # noqa: E402

MODELS = "zoo:cnn,zoo:resnet20,zoo:mobilenet_v2,zoo:vit_tiny,zoo:minilm_cls,zoo:gpt,zoo:gcn,zoo:vae,zoo:ddpm,zoo:c3d"
OPTIMIZATIONS = "int8,fp8,mxfp4,2:4,structured50,lowrank,passes"
HARDWARE = "local,a100,h100,rpi4,alveo-u250"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="benchmarks/results/compare.json")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--optimizations", default=OPTIMIZATIONS)
    ap.add_argument("--hardware", default=HARDWARE)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--train-steps", type=int, default=None, help="default: each model's recipe, else 200")
    ap.add_argument("--finetune-steps", type=int, default=None, help="default: each model's recipe, else 50")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    kiln = [sys.executable, "-c", "from kiln.cli.main import main; main()"]
    argv = ["compare", "--models", args.models, "--optimizations", args.optimizations, "--hardware", args.hardware,
            "--out", args.out, "--backend", args.backend, "--rounds", str(args.rounds)]
    argv += ["--train-steps", str(args.train_steps)] * (args.train_steps is not None)
    argv += ["--finetune-steps", str(args.finetune_steps)] * (args.finetune_steps is not None)
    argv += ["--no-latency"] * args.no_latency + ["--resume"] * args.resume
    t0, load = time.monotonic(), os.getloadavg()[0]
    proc = subprocess.run([*kiln, *argv], text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"kiln {' '.join(argv)} failed with exit code {proc.returncode}")
    results = json.loads((Path(args.out) / "compare.json").read_text())
    full = all(set(getattr(args, k).split(",")) == set(v.split(","))
               for k, v in (("models", MODELS), ("optimizations", OPTIMIZATIONS), ("hardware", HARDWARE)))
    summary = {"date": str(date.today()), "command": "kiln " + " ".join(argv), "wall_s": wall,
               "full_matrix": full, "cells": len(results["cells"]), "cells_run": results["cells_run"],
               "cells_resumed": results["cells_resumed"], "latencies_added": results.get("latencies_added", 0),
               "cells_failed": sum(1 for c in results["cells"] if "error" in c),
               "load_avg_1min_at_start": load, "cpus": os.cpu_count(), "observations": results["observations"]}
    print(json.dumps({k: v for k, v in summary.items() if k != "observations"}, indent=2))
    for line in results["observations"]:
        print("-", line)
    if args.json:
        write_with_history(args.json, {"summary": summary, "results": results})


if __name__ == "__main__":
    main()

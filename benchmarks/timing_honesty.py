"""How kiln's measured figures behave on a quiet and on a busy machine (issue 19, items 4 and 5).

    .venv/bin/python benchmarks/timing_honesty.py [calibrate] [prune] [--json PATH]

calibrate: `kiln hardware calibrate` twice, on the machine as it is and with a competing
    process spinning on both cores (two torch matmul threads), into a scratch KILN_HOME; the
    peaks, each peak's median call, and the warnings, side by side.
prune: `kiln prune zoo:resnet20 --method structured --ratio 0.5 --no-eval` four times in fresh
    processes, as the issue did (it read 1.519 -> 140.005 ms, 152.070 -> 0.971 ms, ...), quiet
    and then with the same competing process: each run's dense and pruned latency with its
    min, p90 and the contention flag kiln.timing gives it.
Every command runs through the CLI, as a user runs it; the figures are what it prints as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILN = [sys.executable, "-m", "kiln.cli.main"]
BUSY = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\n"
        "while True:\n    a @ a\n")


@contextlib.contextmanager
def competing(on: bool):
    """A process keeping both cores busy for as long as the block runs."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def kiln_json(args: list[str], env: dict) -> dict:
    proc = subprocess.run(KILN + args + ["--json", "-"], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"kiln {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def calibrate(env: dict) -> dict:
    rows = {}
    for label, busy in (("quiet", False), ("busy", True)):
        with competing(busy):
            out = kiln_json(["hardware", "calibrate", "--force", "--name", f"honesty-{label}"], env)
        rows[label] = {"peaks": out["peaks"], "warnings": out["warnings"]}
        print(label, json.dumps(rows[label], indent=1), flush=True)
    return rows


def prune(env: dict, repeats: int = 4) -> dict:
    rows = {}
    for label, busy in (("quiet", False), ("busy", True)):
        runs = []
        with competing(busy), tempfile.TemporaryDirectory() as tmp:
            for i in range(repeats):
                out = kiln_json(["prune", "zoo:resnet20", "--method", "structured", "--ratio", "0.5", "--no-eval",
                                 "--out", f"{tmp}/r{i}"], env)
                b, a = out["report"]["before"], out["report"]["after"]
                runs.append({"dense": b["latency"], "pruned": a["latency"], "note": a["timing_note"],
                             "speedup": b["latency"]["median_s"] / a["latency"]["median_s"]})
                print(f"{label} run {i}: dense {b['latency']['median_s'] * 1e3:.3f} ms (min "
                      f"{b['latency']['min_s'] * 1e3:.3f}, p90 {b['latency']['p90_s'] * 1e3:.3f}) -> pruned "
                      f"{a['latency']['median_s'] * 1e3:.3f} ms (min {a['latency']['min_s'] * 1e3:.3f}, p90 "
                      f"{a['latency']['p90_s'] * 1e3:.3f}); {a['timing_note'] or 'no contention flagged'}", flush=True)
        rows[label] = runs
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", help="calibrate, prune (default: both)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "timing_honesty.json"))
    args = parser.parse_args()
    args.parts = args.parts or ["calibrate", "prune"]
    if set(args.parts) - {"calibrate", "prune"}:
        parser.error(f"unknown part in {args.parts}; choose from calibrate, prune")
    with tempfile.TemporaryDirectory() as home:
        env = os.environ | {"KILN_HOME": home, "PYTHONPATH": str(ROOT)}
        result = {"date": str(date.today()), "cpus": os.cpu_count()}
        if "calibrate" in args.parts:
            result["calibrate"] = calibrate(env)
        if "prune" in args.parts:
            result["prune"] = prune(env)
    sys.path.insert(0, str(Path(__file__).parent))
    from common import write_with_history

    write_with_history(args.json, result, summary_key="calibrate")


if __name__ == "__main__":
    main()

"""Compressed MiniLM artifacts judged against their roofline before they are compiled: a
structured-pruned, a 2:4, an int8 (W8A8 SmoothQuant) and an MXFP4 run of zoo:minilm, each
costed as it runs (kiln.analysis.execution) on a100, h100 and this machine's 'local' profile,
beside the source's roofline and the eager latency measured here.

    .venv/bin/python benchmarks/artifact_roofline.py [--json PATH] [--runs DIR] [--rounds 20]

The artifacts are made with kiln's own commands (`kiln prune`, `kiln quantize`, --no-eval)
when DIR does not hold them yet. Measured latency: the model as `kiln eval` runs it (eager,
batch 1, the zoo's 1x128 input), source and artifact interleaved by kiln.timing.measure; the
quantized runs are fake-quantized in eager (slower than fp32: their int8 kernels are
`kiln compile --precision int8`'s), the 2:4 run uses dense kernels. Latencies need a quiet
machine: the note in the JSON says whether this one was.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import write_with_history  # noqa: E402

from kiln.analysis.execution import as_it_runs as cost_as_it_runs  # noqa: E402
from kiln.analysis.report import analyze  # noqa: E402
from kiln.analysis.roofline import roofline  # noqa: E402
from kiln.hardware.profiles import available, load_profile  # noqa: E402
from kiln.runs.artifact import load_source  # noqa: E402
from kiln.runs.execution import as_it_runs  # noqa: E402
from kiln.timing import TimingConfig, measure  # noqa: E402

KILN = os.path.join(os.path.dirname(sys.executable), "kiln")
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = {
    "structured-50": ["prune", "zoo:minilm", "--method", "structured", "--ratio", "0.5", "--no-eval"],
    "2of4": ["prune", "zoo:minilm", "--method", "nm", "--nm", "2:4", "--no-eval"],
    "w8a8": ["quantize", "zoo:minilm", "--config", str(REPO / "configs/quant/minilm-w8a8-smooth.toml"),
             "--no-eval", "--calib-batches", "2"],
    "mxfp4": ["quantize", "zoo:minilm", "--config", str(REPO / "configs/quant/minilm-mx4.toml"),
              "--no-eval", "--calib-batches", "2"],
}
HARDWARE = ("a100", "h100", "local")


def make(runs: Path) -> None:
    for name, argv in ARTIFACTS.items():
        if not (runs / name / "artifact.json").is_file():
            subprocess.run([KILN, *argv, "--out", str(runs / name)], check=True, capture_output=True)


def local_profile():
    """The saved 'local' profile (`kiln hardware calibrate`, run on a quiet machine), else a quick
    calibration kept to this run (not saved: a busy machine's peaks must not become the profile)."""
    if "local" in available():
        return load_profile("local")
    from kiln.hardware.calibrate import calibrate

    return calibrate("local", budget_s=2.0).profile


def rooflines(name: str, run: Path, profiles: dict, rounds: int) -> dict:
    source = load_source(str(run))
    kw, args = source.example_kwargs, source.example_inputs
    base = load_source(source.spec)
    timed = measure({"source": lambda: base.model(*args, **kw), name: lambda: source.model(*args, **kw)},
                    TimingConfig(rounds=rounds))
    model, execution = as_it_runs(source.model, source.transforms)
    art = analyze(dataclasses.replace(source.loaded, model=model), profiles["h100"], measure_time=False,
                  execution=execution)
    ref = analyze(base.loaded, profiles["h100"], measure_time=False)
    out = {"flops": {"source": ref.flops, "dense": art.flops, "as_it_runs": art.runs_as.flops},
           "weight_bytes": {"source": ref.param_bytes, "as_it_runs": art.runs_as.weight_bytes},
           "bytes": {"source": ref.cost.bytes, "as_it_runs": art.runs_as.bytes},
           "notes": list(execution.notes), "roofline_s": {}}
    for hw_name, hw in profiles.items():
        runs = cost_as_it_runs(art.graph, execution, hw)
        out["roofline_s"][hw_name] = {"source": roofline(ref.graph, hw)[1].latency_s,
                                      "as_it_runs": runs.roofline.latency_s, "op_keys": runs.keys}
    out["measured"] = {"source_s": timed["source"].median, "artifact_s": timed[name].median,
                       "threads": torch.get_num_threads(), "note": timed.note()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--runs", default="runs/artifact_roofline")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    runs = Path(args.runs)
    make(runs)
    profiles = {h: (local_profile() if h == "local" else load_profile(h)) for h in HARDWARE}
    summary = {"date": str(date.today()), "rounds": args.rounds,
               "local_profile": profiles["local"].peak_flops | {"memory_bandwidth": profiles["local"].memory_bandwidth},
               "artifacts": {name: rooflines(name, runs / name, profiles, args.rounds) for name in ARTIFACTS},
               "load_avg_1min": os.getloadavg()[0]}
    for name, r in summary["artifacts"].items():
        print(name, {h: (f"{v['source'] * 1e6:.1f} us", f"{v['as_it_runs'] * 1e6:.1f} us")
                     for h, v in r["roofline_s"].items()},
              f"measured {r['measured']['source_s'] * 1e3:.2f} -> {r['measured']['artifact_s'] * 1e3:.2f} ms",
              r["measured"]["note"])
    if args.json:
        write_with_history(args.json, {"summary": summary})


if __name__ == "__main__":
    main()

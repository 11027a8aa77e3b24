"""Synthesize kiln hw emit's dense-layer modules with yosys (xilinx and ice40) at several reuse
factors and bit widths, and record each module's structure and its yosys cell counts: the rows
kiln.hw.estimate is calibrated on (benchmarks/results/hw_calibration.json).

    PYTHONPATH=. python benchmarks/hw_calibrate.py [--out benchmarks/results/hw_calibration.json]

Each row is one layer module synthesized alone (kiln.hw.estimate.SYNTH: `kiln hw synth`'s
commands, yosys `stat -json`); rows already in the output file are kept (the script resumes).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from kiln.hw.design import EmitConfig, emit
from kiln.hw.estimate import SYNTH, cell_counts, layer_features
from kiln.hw.tools import run_yosys, yosys_version
from kiln.quant.config import parse_config
from kiln.quant.run import quantize_run

SRC = "py:benchmarks/hw_small_mlp.py:small_mlp"
# (bits, {layer: reuse}): reuse = K gives PO = N multipliers; K * d gives N / d
PLAN = [(8, {"layers.0": 256, "head": 160}), (4, {"layers.0": 256, "head": 160}),
        (8, {"layers.0": 64, "head": 32}), (4, {"layers.0": 64, "head": 32}),
        (8, {"layers.0": 16, "head": 64}), (4, {"layers.0": 16, "head": 64})]


def quantized(bits: int, work: Path) -> Path:
    out = work / f"q{bits}"
    if not out.exists():
        cfg = parse_config({"targets": ["Linear"], "weight": {"format": "int", "bits": bits, "granularity": "channel"},
                            "input": {"format": "int", "bits": bits, "granularity": "tensor", "calib": "minmax"}})
        quantize_run(SRC, cfg, out, dataset="digits", calib_batches=2, evaluate=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/hw_calibration.json")
    ap.add_argument("--targets", default="xilinx,ice40")
    args = ap.parse_args()
    path = Path(args.out)
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {(r["design"], r["layer"], r["target"]) for r in rows}
    work = Path(tempfile.mkdtemp(prefix="kiln-hwcal-"))
    version = yosys_version()
    try:
        for bits, reuse in PLAN:
            tag = f"w{bits}a{bits}-" + "-".join(f"{k}={v}" for k, v in reuse.items())
            d = work / tag
            design = emit(str(quantized(bits, work)), d, EmitConfig(layer_reuse=tuple(reuse.items()), check_samples=0))
            for module, rec in zip(design["modules"], design["layers"]):
                if rec["kind"] != "dense":
                    continue
                for target in args.targets.split(","):
                    if (tag, rec["name"], target) in done:
                        continue
                    t0 = time.time()
                    run_yosys(f"read_verilog -sv {module}.sv\n{SYNTH[target]} -top {module}\n"
                              f"tee -q -o stat.json stat -json\n", cwd=d / "rtl")
                    cells = cell_counts(json.loads((d / "rtl" / "stat.json").read_text()), target)
                    rows.append({"design": tag, "layer": rec["name"], "target": target, "yosys": version,
                                 "features": layer_features(rec), **cells, "synth_s": round(time.time() - t0, 1)})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps({"source": SRC, "rows": rows}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

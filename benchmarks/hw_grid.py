"""The resource grid of issue 16: yosys counts for the MLP and the CNN x 3 reuse settings x 2 bit
widths x {xilinx, ice40}, each beside kiln.hw.estimate's prediction.

    PYTHONPATH=. python benchmarks/hw_grid.py [--nets jet,cnn] [--bits 8,4] [--targets xilinx,ice40]
        [--json benchmarks/results/hw_grid.json]

Synthesis is per module (one yosys run per layer module, `kiln hw synth`'s commands on that
module alone, as benchmarks/hw_calibrate.py does): kiln_top only wires the layers, so a design's
total is the sum of its modules'. Each module's counts are cached by the hash of its text, its
ROM and the yosys script (benchmarks/results/hw_grid_modules.jsonl, a working file): a layer
emitted identically in two designs (same weights, widths and reuse) is synthesized once, and an
interrupted grid resumes. Rows also record the estimator's figures (in sample: the fit has seen
the rows; `--refresh` recomputes them after a refit); the estimator's leave-one-design-out
errors are computed by benchmarks/hw_cost_models.py --parts estimator.
Nothing is timed (the seconds recorded are the machine's, for planning only).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import merge_result  # noqa: E402
from hw_rtl import CNN_REUSE, JET_REUSE, design, jet_design, models  # noqa: E402

from kiln.hw.design import load_design  # noqa: E402
from kiln.hw.estimate import SYNTH, Target, cell_counts, estimate_layers, layer_features, pool_features  # noqa: E402
from kiln.hw.tools import run_yosys, yosys_version  # noqa: E402

CACHE = Path("benchmarks/results/hw_grid_modules.jsonl")


def _key(rtl: Path, module: str, target: str) -> str:
    h = hashlib.sha256((rtl / f"{module}.sv").read_bytes())
    mem = rtl / f"{module}_w.mem"
    if mem.exists():
        h.update(mem.read_bytes())
    h.update(SYNTH[target].encode())
    return h.hexdigest()[:20]


def _cache(json_path: str | None = None) -> dict[str, dict]:
    """Module counts by key: the working file's, and those of the rows already in the results
    JSON (the working file is not committed; a module's key covers its text, ROM and script)."""
    out: dict[str, dict] = {}
    if json_path and Path(json_path).exists():
        grid = json.loads(Path(json_path).read_text()).get("grid", {})
        for key, row in grid.get("rows", {}).items():
            target = key.rsplit(" ", 1)[1]
            for lay in row["layers"]:
                out[lay["key"]] = {"key": lay["key"], "module": lay["layer"], "target": target, **lay["yosys"]}
    if CACHE.exists():
        rows = [json.loads(ln) for ln in CACHE.read_text().splitlines() if ln.strip()]
        out.update({r["key"]: r for r in rows})
    return out


def synth_module(rtl: Path, module: str, target: str, cache: dict) -> dict:
    """yosys cell counts of one layer module synthesized alone (cached)."""
    key = _key(rtl, module, target)
    if key in cache:
        return cache[key]
    with tempfile.TemporaryDirectory(prefix="kiln-hwgrid-") as tmp:
        work = Path(tmp)
        for f in rtl.iterdir():
            if f.name.startswith(module):
                (work / f.name).write_bytes(f.read_bytes())
        t0 = time.time()
        run_yosys(f"read_verilog -sv {module}.sv\n{SYNTH[target]} -top {module}\n"
                  "tee -q -o stat.json stat -json\n", cwd=work, timeout=7200)
        cells = cell_counts(json.loads((work / "stat.json").read_text()), target)
    row = {"key": key, "module": module, "target": target, **cells, "seconds": round(time.time() - t0, 1)}
    cache[key] = row
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with CACHE.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def grid_row(d: Path, target: str, cache: dict) -> dict:
    des, layers = load_design(d)
    rtl = d / "rtl"
    est = estimate_layers(layers, Target(target))
    per_layer = []
    for module, rec, e in zip(des["modules"], des["layers"], est.layers):
        y = synth_module(rtl, module, target, cache)
        per_layer.append({"layer": rec["name"], "kind": rec["kind"], "reuse": rec.get("reuse"), "key": y["key"],
                          "features": layer_features(rec) if rec["kind"] == "dense" else pool_features(rec),
                          "rec": {k: rec[k] for k in ("in_shape", "out_shape", "kernel", "stride", "in_bits", "out_bits")},
                          "yosys": {k: y[k] for k in ("luts", "ffs", "dsps", "brams", "carry", "lutram")},
                          "estimate": {"luts": e.luts, "ffs": e.ffs, "dsps": e.dsps, "brams": e.brams}})
    tot = {k: sum(p["yosys"][k] for p in per_layer) for k in ("luts", "ffs", "dsps", "brams", "carry", "lutram")}
    etot = {"luts": est.luts, "ffs": est.ffs, "dsps": est.dsps, "brams": est.brams}
    return {"yosys": tot, "estimate": etot, "lut_error": (etot["luts"] - tot["luts"]) / max(tot["luts"], 1),
            "dsp_exact": etot["dsps"] == tot["dsps"], "cycles": des["cycles"], "layers": per_layer}


def refresh(json_path: str) -> None:
    """Recompute the rows' estimates from their recorded features with the estimator's current
    coefficients (after a refit: `hw_cost_models.py --parts estimator --refit`); no synthesis."""
    from kiln.hw.estimate import estimate_features

    res = json.loads(Path(json_path).read_text())["grid"]
    for key, row in res["rows"].items():
        target = Target(key.rsplit(" ", 1)[1])
        for lay in row["layers"]:
            luts, ffs, dsps, brams = estimate_features(lay["features"], target)
            lay["estimate"] = {"luts": luts, "ffs": ffs, "dsps": dsps, "brams": brams}
        row["estimate"] = {k: sum(lay["estimate"][k] for lay in row["layers"]) for k in ("luts", "ffs", "dsps", "brams")}
        row["lut_error"] = (row["estimate"]["luts"] - row["yosys"]["luts"]) / max(row["yosys"]["luts"], 1)
        row["dsp_exact"] = row["estimate"]["dsps"] == row["yosys"]["dsps"]
        print(f"{key:28} yosys LUTs {row['yosys']['luts']:7,} est {row['estimate']['luts']:7,} ({row['lut_error']:+.1%})")
    merge_result(json_path, "grid", res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refresh", action="store_true", help="only recompute the recorded rows' estimates")
    ap.add_argument("--nets", default="jet,cnn")
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--targets", default="xilinx,ice40")
    ap.add_argument("--json", default="benchmarks/results/hw_grid.json")
    args = ap.parse_args()
    if args.refresh:
        return refresh(args.json)
    nets = args.nets.split(",")
    runs = models() if "cnn" in nets else {}
    cache = _cache(args.json)
    out = json.loads(Path(args.json).read_text()).get("grid", {}).get("rows", {}) if Path(args.json).exists() else {}
    version = yosys_version()
    for net in nets:
        table = JET_REUSE if net == "jet" else CNN_REUSE
        for bits in map(int, args.bits.split(",")):
            for label, reuse in table.items():
                name = f"{net}{bits}-{label}"
                d = jet_design(bits, name, reuse) if net == "jet" else design(runs[f"{net}{bits}"], name, reuse)
                for target in args.targets.split(","):
                    key = f"{net} int{bits} {label} {target}"
                    out[key] = grid_row(d, target, cache)
                    r = out[key]
                    print(f"{key:28} yosys LUTs {r['yosys']['luts']:7,} est {r['estimate']['luts']:7,} "
                          f"({r['lut_error']:+.1%})  DSPs {r['yosys']['dsps']:4} est {r['estimate']['dsps']:4}  "
                          f"FFs {r['yosys']['ffs']:6,} est {r['estimate']['ffs']:6,}  BRAM {r['yosys']['brams']}",
                          flush=True)
                    merge_result(args.json, "grid", {"date": str(date.today()), "yosys": version,
                                                     "scripts": SYNTH, "rows": out})


if __name__ == "__main__":
    main()

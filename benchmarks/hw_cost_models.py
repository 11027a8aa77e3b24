"""Figures of kiln's accelerator cost models (issue 16, items 4 and 5).

    PYTHONPATH=. python benchmarks/hw_cost_models.py [--parts systolic,rtl,estimator,search]
        [--mlp RUN] [--trials 16] [--json benchmarks/results/hw_cost_models.json] [--refit]

- systolic: kiln.hw.systolic's cycles against SCALE-Sim 3.0's compute model (its
  systolic_compute_{ws,is,os} classes called directly: the CLI crashes with numpy 2.4) on a
  grid of GEMMs and array sizes, every dataflow; and its SRAM request counts.
- rtl: the systolic arrays kiln emits (kiln.hw.systolic_rtl), simulated in Icarus: products
  exact and busy cycles equal to the model's.
- estimator: kiln.hw.estimate against yosys on the calibration rows
  (benchmarks/hw_calibrate.py); `--refit` fits the coefficients again and prints them.
- search: a mixed-precision search of a trained zoo MLP (`--mlp`: a `kiln train zoo:mlp` run)
  for accuracy against estimated LUTs (ice40), beside the uniform bit widths.
Nothing here is timed: every figure is a count.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import merge_result  # noqa: E402

from kiln.hw.systolic import Dataflow, Gemm, compute_cycles, sram_traffic  # noqa: E402

GRID_MNK = [1, 5, 16, 37, 64]
ARRAYS = [(4, 4), (8, 8), (16, 16), (8, 32), (32, 4)]


def scalesim(df: Dataflow, m: int, n: int, k: int, rows: int, cols: int) -> tuple[int, tuple[int, int, int]]:
    """SCALE-Sim's compute model: (cycles, (ifmap reads, filter reads, ofmap writes))."""
    import importlib

    from scalesim.scale_config import scale_config

    cfg = scale_config()
    cfg.set_arr_dims(rows, cols)
    cfg.valid_conf_flag = True     # what read_conf_file sets
    sim = getattr(importlib.import_module(f"scalesim.compute.systolic_compute_{df.value}"), f"systolic_compute_{df.value}")()
    sim.set_params(config_obj=cfg, ifmap_op_mat=np.arange(m * k).reshape(m, k),
                   filter_op_mat=np.arange(k * n).reshape(k, n) + m * k,
                   ofmap_op_mat=np.arange(m * n).reshape(m, n) + m * k + k * n)
    sim.create_demand_matrices()
    return sim.ifmap_demand_matrix.shape[0], (sim.ifmap_reads, sim.filter_reads, sim.ofmap_writes)


def part_systolic() -> dict:
    from importlib.metadata import version

    rows, mismatches, reads_equal, reads_total = 0, [], 0, 0
    for (m, n, k), (r, c), df in itertools.product(itertools.product(GRID_MNK, repeat=3), ARRAYS, Dataflow):
        ref_cycles, ref_traffic = scalesim(df, m, n, k, r, c)
        ours = compute_cycles(Gemm("g", m, n, k), r, c, df)
        rows += 1
        if ours != ref_cycles:
            mismatches.append({"mnk": [m, n, k], "array": [r, c], "dataflow": df.value, "kiln": ours, "scalesim": ref_cycles})
        # SRAM reads; OS ofmap writes differ by design (SCALE-Sim adds R + C per fold, line 403)
        t = sram_traffic(Gemm("g", m, n, k), r, c, df)
        compared = 2 if df is Dataflow.OS else 3
        reads_total += 1
        reads_equal += t[:compared] == tuple(ref_traffic[:compared])
    out = {"scalesim": version("scalesim"), "cases": rows, "cycles_equal": rows - len(mismatches),
           "mismatches": mismatches[:10], "sram_counts_equal": reads_equal, "sram_counts_cases": reads_total,
           "grid": {"m_n_k": GRID_MNK, "arrays": [f"{r}x{c}" for r, c in ARRAYS], "dataflows": [d.value for d in Dataflow]}}
    print(f"systolic vs SCALE-Sim {out['scalesim']}: cycles equal in {out['cycles_equal']}/{rows} cases; "
          f"SRAM request counts equal in {reads_equal}/{reads_total}", flush=True)
    return out


RTL_CASES = [(8, 8, 8, 4, 4), (10, 7, 5, 4, 3), (16, 12, 20, 4, 4), (5, 9, 11, 3, 4), (32, 16, 16, 8, 8), (24, 10, 7, 2, 5)]


def part_rtl() -> dict:
    from kiln.hw.systolic_rtl import emit, simulate
    from kiln.hw.tools import tool_version

    rows = []
    rng = np.random.default_rng(0)
    for (m, n, k, r, c), df in itertools.product(RTL_CASES, Dataflow):
        a, b = rng.integers(-128, 128, (m, k)), rng.integers(-128, 128, (k, n))
        with tempfile.TemporaryDirectory() as d:
            sim = simulate(emit(df, r, c, a, b, Path(d)))
        model = compute_cycles(Gemm("g", m, n, k), r, c, df)
        rows.append({"mnk": [m, n, k], "array": f"{r}x{c}", "dataflow": df.value, "simulated": sim.cycles,
                     "model": model, "exact_product": bool(np.array_equal(sim.out, a @ b))})
    equal = sum(r["simulated"] == r["model"] for r in rows)
    exact = sum(r["exact_product"] for r in rows)
    print(f"emitted arrays in {tool_version('iverilog')}: cycles equal to the model in {equal}/{len(rows)}, "
          f"products exact in {exact}/{len(rows)}", flush=True)
    return {"icarus": tool_version("iverilog"), "cases": rows, "cycles_equal": equal, "exact": exact}


def grid_rows(grid: Path) -> list[dict]:
    """The per-module rows of benchmarks/hw_grid.py's designs, in the calibration rows' form."""
    if not grid.exists():
        return []
    rows = []
    for key, row in json.loads(grid.read_text()).get("grid", {}).get("rows", {}).items():
        design, target = key.rsplit(" ", 1)
        for lay in row["layers"]:
            if "key" not in lay:      # written before the grid recorded module keys: rerun hw_grid.py
                continue
            rows.append({"design": design, "layer": lay["layer"], "target": target, "features": lay["features"],
                         "key": lay["key"], **lay["yosys"]})
    return rows


def part_estimator(calibration: Path, refit: bool, grid: Path = Path("benchmarks/results/hw_grid.json")) -> dict:
    """The estimator against yosys: every module row (calibration + grid) in sample, and each
    design priced by a fit that saw neither its design nor any module identical to one of its
    modules (leave one design out)."""
    from kiln.hw.estimate import COEFFICIENTS, Target, estimate_features, fit, write_coefficients

    everything = json.loads(calibration.read_text())["rows"] + grid_rows(grid)
    data = [r for r in everything if not r.get("validation")]     # validation rows are never fitted
    coefficients = COEFFICIENTS
    kinds = ("luts", "ffs", "pool_luts", "pool_ffs")
    if refit:
        coefficients = {t: {w: fit(data, t, w) for w in kinds} for t in sorted({r["target"] for r in data})}
        print(f"coefficients written to {write_coefficients(coefficients)}:", json.dumps(coefficients))
    rows = []
    for r in everything:
        luts, ffs, dsps, brams = estimate_features(r["features"], Target(r["target"]), coefficients)
        rows.append({"design": r["design"], "layer": r["layer"], "target": r["target"], "yosys_luts": r["luts"],
                     "est_luts": luts, "lut_error": (luts - r["luts"]) / max(r["luts"], 1), "yosys_dsps": r["dsps"],
                     "est_dsps": dsps, "yosys_ffs": r["ffs"], "est_ffs": ffs, "yosys_brams": r["brams"], "est_brams": brams,
                     "validation": bool(r.get("validation"))})
        print(f"  {r['target']:6} {r['design']:34} {r['layer']:10} LUTs {r['luts']:6} est {luts:6} "
              f"({rows[-1]['lut_error']:+.1%})  DSPs {r['dsps']:3} est {dsps:3}  FFs {r['ffs']:5} est {ffs:5}", flush=True)
    # leave one design out: a design's modules priced by a fit on the other designs' modules
    # (same target), none of them identical to one of its own (same text, ROM and script)
    designs = []
    for target, design in sorted({(r["target"], r["design"]) for r in everything}):
        mine = [r for r in everything if (r["target"], r["design"]) == (target, design)]
        keys = {r.get("key") for r in mine} - {None}
        others = [r for r in data if r["target"] == target and r["design"] != design and r.get("key") not in keys]
        if len([r for r in others if "pool" not in r["features"]]) < 3:
            continue
        held = {target: {w: fit(others, target, w) for w in kinds}}
        est = [estimate_features(r["features"], Target(target), held) for r in mine]
        y_luts, e_luts = sum(r["luts"] for r in mine), sum(e[0] for e in est)
        y_dsps, e_dsps = sum(r["dsps"] for r in mine), sum(e[2] for e in est)
        designs.append({"target": target, "design": design, "modules": len(mine), "yosys_luts": y_luts,
                        "held_out_luts": e_luts, "held_out_error": (e_luts - y_luts) / max(y_luts, 1),
                        "yosys_dsps": y_dsps, "est_dsps": e_dsps, "yosys_ffs": sum(r["ffs"] for r in mine),
                        "held_out_ffs": sum(e[1] for e in est)})
        d = designs[-1]
        print(f"  held out {target:6} {design:34} LUTs {y_luts:7,} est {e_luts:7,} ({d['held_out_error']:+.1%})  "
              f"DSPs {y_dsps:4} est {e_dsps:4}", flush=True)
    if designs:
        print(f"leave one design out: LUTs within 15% in {sum(abs(d['held_out_error']) <= 0.15 for d in designs)}"
              f"/{len(designs)} designs, worst {max(abs(d['held_out_error']) for d in designs):.1%}; DSPs exact in "
              f"{sum(d['yosys_dsps'] == d['est_dsps'] for d in designs)}/{len(designs)}")
    fitted = [r for r in rows if not r["validation"]]
    within = sum(abs(r["lut_error"]) <= 0.15 for r in fitted)
    dsp_exact = sum(r["yosys_dsps"] == r["est_dsps"] for r in rows)
    print(f"estimator vs yosys: LUTs within 15% in {within}/{len(fitted)} module rows in sample; DSPs exact in "
          f"{dsp_exact}/{len(rows)} rows (validation rows included)")
    return {"yosys": data[0]["yosys"] if data and "yosys" in data[0] else "", "rows": rows, "luts_within_15pct": within,
            "dsps_exact": dsp_exact, "refit": refit, "held_out_designs": designs,
            "held_out_within_15pct": sum(abs(d["held_out_error"]) <= 0.15 for d in designs)}


def part_search(mlp: str, trials: int, out_dir: Path) -> dict:
    """NSGA-II over per-layer weight widths (2 to 8 bits, per channel) of a trained zoo MLP with
    4-bit activations, for accuracy on 500 validation digits against the estimated LUTs of kiln
    hw emit's xilinx design at reuse K; the uniform widths are run first (seed_uniform). With
    4-bit inputs, yosys maps a 4 x w multiplier to a DSP48 only from w = 5 (a product of at
    least 9 bits), so narrow weights trade DSPs for LUTs: both are recorded."""
    from kiln.search.config import parse_search_config
    from kiln.search.run import run_search

    table = {"study": "mlp-luts", "objectives": ["accuracy", "luts"], "sampler": "nsga2", "trials": trials,
             "population": 6, "seed": 0,
             "space": {"kind": "mixed-precision", "source": mlp, "bits": [2, 3, 4, 6, 8], "act_bits": 4,
                       "granularity": "channel", "samples": 500, "seed_uniform": True,
                       "hw": {"target": "xilinx", "reuse": 0}}}
    cfg = parse_search_config(table, "hw_cost_models search")
    run_search(cfg, out_dir, progress=False, log=print)
    summary = json.loads((out_dir / "results.json").read_text())
    # a trial repeating a completed one's widths takes its values (and has no attrs of its own)
    points = [{"trial": t["number"], "bits": t["params"], "accuracy": t["values"][0], "luts": t["values"][1],
               "dsps": t["attrs"].get("dsps"), "fpga_cycles": t["attrs"].get("fpga_cycles"),
               "avg_bits": t["attrs"].get("avg_bits")}
              for t in summary["trials_detail"] if t["state"] == "COMPLETE"]
    front = [p for p in points if not any(q["accuracy"] >= p["accuracy"] and q["luts"] <= p["luts"]
                                          and (q["accuracy"], q["luts"]) != (p["accuracy"], p["luts"]) for q in points)]
    uniform = [p for p in points if len(set(p["bits"].values())) == 1]
    for p in sorted(points, key=lambda p: p["luts"]):
        tag = ("front " if p in front else "      ") + ("uniform" if p in uniform else "")
        print(f"  {tag:14} bits {p['bits']}  accuracy {p['accuracy']:.3f}  LUTs {p['luts']:,.0f}  DSPs {p['dsps']}")
    return {"config": table, "points": points, "front": [p["trial"] for p in front],
            "uniform": [p["trial"] for p in uniform]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="systolic,rtl,estimator")
    ap.add_argument("--calibration", default="benchmarks/results/hw_calibration.json")
    ap.add_argument("--refit", action="store_true")
    ap.add_argument("--mlp", default="", help="a `kiln train zoo:mlp` run for the search part")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--search-out", default="runs/benchmarks/hw_search")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    results = {"date": date.today().isoformat()}
    parts = args.parts.split(",")
    if "systolic" in parts:
        results["systolic_vs_scalesim"] = part_systolic()
    if "rtl" in parts:
        results["systolic_rtl"] = part_rtl()
    if "estimator" in parts:
        results["estimator_vs_yosys"] = part_estimator(Path(args.calibration), args.refit)
    if "search" in parts:
        results["search"] = part_search(args.mlp, args.trials, Path(args.search_out))
    if args.json:   # one entry per part: parts run separately keep each other's figures
        for name, entry in results.items():
            if name != "date":
                merge_result(args.json, name, {"date": results["date"], **entry})


if __name__ == "__main__":
    main()

"""The course's sweep: MiniLM fine-tuned on Rotten Tomatoes, every number-format family at 8, 6
and 4 bits (all Linear weights and inputs), PTQ and QAT side by side. Run through
benchmarks/quant_figures.py sweep; writes a table (markdown) and a plot."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

BITS = (8, 6, 4)
# one representative per family and width; self-scaled formats (mx, bfp) carry their own scales
FAMILIES: dict[str, dict[int, dict]] = {
    "int": {b: {"format": f"int{b}"} for b in BITS},
    "minifloat": {8: {"format": "fp8_e4m3"}, 6: {"format": "fp6_e3m2"}, 4: {"format": "fp4_e2m1"}},
    "mx": {8: {"format": "mxint8"}, 6: {"format": "mxfp6_e3m2"}, 4: {"format": "mxfp4"}},
    "bfp": {b: {"format": f"bfp{b}"} for b in BITS},
    "log": {b: {"format": "log", "bits": b} for b in BITS},
    "fixed": {b: {"format": "fixed", "width": b, "frac": b - 4} for b in BITS},   # range +-8, step 2^(4-b)
}
# binary and ternary exist at one width each: weights only, inputs int8
EXTRA = {"binary (W1A8)": {"weight": {"format": "binary_scaled"}, "input": {"format": "int8"}},
         "ternary (W2A8)": {"weight": {"format": "ternary"}, "input": {"format": "int8"}}}
QAT = dict(epochs=1, max_steps=60, lr=2e-5, batch_size=32, warmup_fraction=0.0, weight_decay=0.01,
           schedule="cosine", calib_batches=8)


def _configs() -> dict[str, dict]:
    out = {}
    for fam, by_bits in FAMILIES.items():
        for b, fmt in by_bits.items():
            w = dict(fmt)
            if fam in ("int", "minifloat", "log"):
                w["granularity"] = "channel"
            out[f"{fam}{b}"] = {"weight": w, "input": dict(fmt), "_family": fam, "_bits": b}
    for name, table in EXTRA.items():
        out[name] = {**table, "_family": name, "_bits": None}
    return out


def exp_sweep(out: Path, ptq, qat, to_toml, run: Path) -> dict:
    if not (run / "model.safetensors").is_file():
        sys.exit(f"{run} is missing: train it with benchmarks/train_figures.py minilm")
    fp32 = json.loads((run / "metrics.json").read_text())["after"]
    (out / "configs").mkdir(parents=True, exist_ok=True)
    rows = []
    only = set(filter(None, os.environ.get("KILN_SWEEP_ONLY", "").split(",")))
    for name, table in _configs().items():
        if only and name not in only:
            continue
        fam, bits = table.pop("_family"), table.pop("_bits")
        path = out / "configs" / f"{name.split()[0]}.toml"
        path.write_text(to_toml(table))
        p = ptq(run, path, out / f"ptq-{name.split()[0]}", calib_batches=16, fp32_metric=fp32)
        print(f"sweep {name}: PTQ {p['value']:.4f}", file=sys.stderr, flush=True)
        q = qat(run, path, out / f"qat-{name.split()[0]}", **QAT)
        print(f"sweep {name}: QAT {q['value']:.4f}", file=sys.stderr, flush=True)
        rows.append({"name": name, "family": fam, "bits": bits, "ptq": p["value"], "qat": q["value"],
                     "avg_weight_bits": p["avg_weight_bits"], "ptq_wall_s": p["wall_s"], "qat_wall_s": q["wall_s"]})
    result = {"fp32": fp32, "qat": QAT, "rows": rows}
    figure = Path("benchmarks/results/figures/quant_sweep.png")
    plot(result, figure)
    result["plot"] = str(figure)
    result["table"] = markdown(result)
    print(result["table"])
    return result


def markdown(result: dict) -> str:
    fp32 = result["fp32"]
    lines = [f"| format | bits (W/A) | PTQ accuracy | QAT accuracy | (fp32 {100 * fp32:.1f}%) |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['avg_weight_bits']:g} | {100 * r['ptq']:.1f}% ({100 * (r['ptq'] - fp32):+.1f}) | "
                     f"{100 * r['qat']:.1f}% ({100 * (r['qat'] - fp32):+.1f}) | |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    fams = {}
    for r in result["rows"]:
        if r["bits"] is not None:
            fams.setdefault(r["family"], []).append(r)
    for i, (fam, rs) in enumerate(fams.items()):
        rs = sorted(rs, key=lambda r: r["bits"])
        color = f"C{i}"
        ax.plot([r["bits"] for r in rs], [100 * r["ptq"] for r in rs], "o-", color=color, label=f"{fam} PTQ")
        ax.plot([r["bits"] for r in rs], [100 * r["qat"] for r in rs], "s--", color=color, label=f"{fam} QAT")
    ax.axhline(100 * result["fp32"], color="k", lw=0.8, label="fp32")
    ax.set_xlabel("bits (weights and Linear inputs)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(list(BITS))
    ax.set_title("MiniLM on Rotten Tomatoes: formats x bits, PTQ vs QAT")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

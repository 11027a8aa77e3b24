"""Capture success and FLOPs against torch.utils.flop_counter: every zoo model and every
transformers type kiln builds from its config.

    .venv/bin/python benchmarks/capture_flops.py [--json PATH] [--types bert,gpt2]

For each model: capture with torch.export into kiln's graph (time), kiln's FLOPs, the
flop_counter reference (attention formula filled in, MoE experts as the eager loop), and the
plain flop_counter count, which misses the CPU fused attention.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

from common import write_with_history  # noqa: E402
from kiln.analysis.cost import AnnotateCost  # noqa: E402
from kiln.analysis.oracle import flop_counter_flops  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.graph.capture import capture  # noqa: E402
from kiln.models.hf_config import SUPPORTED  # noqa: E402
from kiln.models.spec import load  # noqa: E402
from kiln.models.zoo import entries  # noqa: E402


def measure(spec: str) -> dict:
    row = {"spec": spec}
    try:
        loaded = load(spec)
    except KilnError as exc:
        return row | {"built": False, "error": str(exc)}
    row["built"] = True
    t0 = time.perf_counter()
    try:
        graph = capture(loaded)
    except KilnError as exc:
        return row | {"captured": False, "error": str(exc)}
    row |= {"captured": True, "capture_s": time.perf_counter() - t0, "ops": len(graph.ops)}
    row["kiln_flops"] = AnnotateCost()(graph).record.flops
    row["reference_flops"] = flop_counter_flops(loaded)
    row["plain_flop_counter"] = flop_counter_flops(loaded, count_cpu_attention=False)
    ref = row["reference_flops"]
    row["rel_error"] = abs(row["kiln_flops"] - ref) / ref if ref else (0.0 if row["kiln_flops"] == 0 else 1.0)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--types", help="comma-separated hf-config types (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    types = args.types.split(",") if args.types else sorted(SUPPORTED)
    specs = [f"zoo:{e.name}" for e in entries()] + [f"hf-config:{t}" for t in types]
    rows = [measure(s) for s in track(specs, description="capturing", console=Console(stderr=True))]
    hf = [r for r in rows if r["spec"].startswith("hf-config:") and r.get("built")]
    zoo = [r for r in rows if r["spec"].startswith("zoo:")]
    summary = {
        "date": date.today().isoformat(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "zoo_captured": f"{sum(r.get('captured', False) for r in zoo)}/{len(zoo)}",
        "hf_types_built": len(hf),
        "hf_types_captured": sum(r.get("captured", False) for r in hf),
        "hf_capture_rate": sum(r.get("captured", False) for r in hf) / max(len(hf), 1),
        "within_1pct": sum(r.get("rel_error", 1) <= 0.01 for r in rows if r.get("captured")),
        "captured_total": sum(r.get("captured", False) for r in rows),
        "max_rel_error": max((r["rel_error"] for r in rows if r.get("captured")), default=0.0),
        "plain_flop_counter_misses": sum(r.get("plain_flop_counter", 0) < r.get("reference_flops", 0) for r in rows),
    }
    table = Table(title="capture and FLOPs against flop_counter")
    for col in ("spec", "captured", "capture s", "kiln FLOPs", "reference", "rel. err", "plain flop_counter"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["spec"], "yes" if r.get("captured") else "NO", f"{r.get('capture_s', 0):.2f}",
                      str(r.get("kiln_flops", "-")), str(r.get("reference_flops", "-")),
                      f"{r['rel_error']:.2e}" if "rel_error" in r else (r.get("error", "")[:60]),
                      str(r.get("plain_flop_counter", "-")))
    console = Console(width=200)
    console.print(table)
    console.print(summary)
    if args.json:
        write_with_history(args.json, {"summary": summary, "rows": rows})


if __name__ == "__main__":
    main()

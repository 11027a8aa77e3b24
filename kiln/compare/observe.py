"""The observations the data supports, each computed from the cells by a rule and carrying
its numbers: nothing here is prose written in advance of the data.

Rules (thresholds below, each a named constant):
- weight quantization on a memory-bound model: on each profile (not `local`) where a model is
  memory-bound at batch 1, the roofline speed-up of each weight-quantized artifact there,
  beside the speed-up measured on this CPU (fake-quantized or int8-kernel, as `kiln compile`
  chose), when the first is >= GAIN and the second is not;
- which families tolerate 2:4 sparsity: metric degradation within TOLERANCE for every model of
  the family;
- attention's share of the FLOPs, and what structured pruning (heads, neurons) removed there;
- how many models are memory-bound at batch 1 on each profile;
- how each optimisation moves arithmetic intensity (the median ratio over models);
- per profile, the fastest artifact by roofline within TOLERANCE of the model's metric.
"""
from __future__ import annotations

import statistics

from kiln.compare.config import BASELINE, OPTIMIZATIONS, CompareConfig

TOLERANCE = 0.02       # relative metric degradation still "tolerated" (2%)
GAIN = 1.1             # a speed-up worth naming (10%)
ATTENTION_PAYS = 0.25  # attention's FLOP share above which pruning heads can pay
LOWER_IS_BETTER = ("loss", "perplexity")   # kiln.train.tasks.metric_for: the others are accuracies


def ok(cell: dict) -> bool:
    return "error" not in cell


def degradation(base: dict, cell: dict) -> float | None:
    """Relative metric loss of `cell` against `base` (> 0: worse), None where unmeasured."""
    b, a = base.get("metric", {}), cell.get("metric", {})
    if b.get("value") is None or a.get("value") is None or not b["value"]:
        return None
    drop = a["value"] - b["value"] if b["key"] in LOWER_IS_BETTER else b["value"] - a["value"]
    return drop / abs(b["value"])


def change(d: float) -> str:
    """A relative degradation in words: 'degraded 7.0%', 'improved 0.3%' (whatever the metric's
    direction: a loss that fell improved)."""
    return "unchanged" if round(d * 100, 1) == 0 else f"{'degraded' if d > 0 else 'improved'} {abs(d) * 100:.1f}%"


def speedup(base_s: float | None, cell_s: float | None) -> float | None:
    return base_s / cell_s if base_s and cell_s else None


def latency_here(cell: dict) -> float | None:
    return (cell.get("latency") or {}).get("latency_s")


def table(cells: list[dict]) -> tuple[dict, dict]:
    """(model -> its baseline cell, (model, optimisation) -> cell), failed cells left out."""
    base = {c["model"]: c for c in cells if c["optimization"] == BASELINE and ok(c)}
    by = {(c["model"], c["optimization"]): c for c in cells if ok(c) and c["model"] in base}
    return base, by


def observations(cells: list[dict], cfg: CompareConfig) -> list[str]:
    base, by = table(cells)
    out: list[str] = []
    remote = [h for h in cfg.hardware if h != "local"]
    for hw in remote:
        out += _quant_on_memory_bound(hw, base, by, cfg)
    out += _nm_by_family(base, by)
    out += _attention(base, by)
    for hw in cfg.hardware:
        out += _bound_count(hw, base)
    if remote:
        out += _intensity(remote[0], base, by, cfg)
    for hw in cfg.hardware:
        out += _fastest(hw, base, by, cfg)
    return out


def _quant_on_memory_bound(hw: str, base: dict, by: dict, cfg: CompareConfig) -> list[str]:
    lines = []
    quant = [o for o in cfg.optimizations if OPTIMIZATIONS.get(o).weight_quant]
    for model, b in base.items():
        bh = b["hardware"][hw]
        if bh["bound"] != "memory":
            continue
        there, here = [], []
        for o in quant:
            c = by.get((model, o))
            if c is None:
                continue
            g = speedup(bh["roofline_s"], c["hardware"][hw]["roofline_s"])
            h = speedup(latency_here(b), latency_here(c))
            if g and g >= GAIN and (h is None or h < GAIN):
                there.append(f"{o} {g:.2f}x")
                here.append(f"{o} {'not measured' if h is None else f'{h:.2f}x'}")
        if there:
            lines.append(f"{model} is memory-bound at batch 1 on {hw} (intensity {bh['intensity']:.3g} FLOP/B, "
                         f"fp32 ridge {bh['ridge']:.3g}): weight quantization cuts its roofline latency there by "
                         f"{', '.join(there)}; measured on this CPU: {', '.join(here)}")
    return lines


def _nm_by_family(base: dict, by: dict) -> list[str]:
    families: dict[str, list[tuple[str, float, dict, dict]]] = {}
    for model, b in base.items():
        c = by.get((model, "2:4"))
        d = degradation(b, c) if c else None
        if d is not None:
            families.setdefault(b["family"], []).append((model, d, b, c))
    lines = []
    for fam, rows in sorted(families.items()):
        worst = max(d for _, d, _, _ in rows)
        verdict = "tolerates" if worst <= TOLERANCE else "does not tolerate"
        detail = "; ".join(f"{m} {b['metric']['key']} {b['metric']['value']:.4g} -> {c['metric']['value']:.4g} "
                           f"({change(d)})" for m, d, b, c in rows)
        lines.append(f"family {fam} {verdict} 2:4 sparsity (worst: {change(worst)}; "
                     f"tolerance {TOLERANCE * 100:.0f}% degradation): {detail}")
    return lines


def _attention(base: dict, by: dict) -> list[str]:
    lines = []
    for model, b in base.items():
        share = b.get("attention_flop_share") or 0.0
        if share == 0.0:
            continue
        c = by.get((model, "structured50"))
        cut = 1 - c["flops"] / b["flops"] if c and b["flops"] else None
        d = degradation(b, c) if c else None
        what = (f"; structured50 (heads and neurons) removes {cut * 100:.0f}% of its FLOPs"
                + (f", its {b['metric']['key']} {change(d)}" if d is not None else "")) if cut is not None else ""
        if share >= ATTENTION_PAYS:
            lines.append(f"attention is {share * 100:.0f}% of {model}'s FLOPs (>= {ATTENTION_PAYS * 100:.0f}%): "
                         f"pruning heads can pay{what}")
        else:
            lines.append(f"attention is only {share * 100:.0f}% of {model}'s FLOPs: pruning heads alone can save "
                         f"at most that{what}")
    return lines


def _bound_count(hw: str, base: dict) -> list[str]:
    if not base:
        return []
    mem = sorted(m for m, b in base.items() if b["hardware"][hw]["bound"] == "memory")
    return [f"on {hw}, {len(mem)} of {len(base)} models are memory-bound at batch 1"
            + (f": {', '.join(mem)}" if mem else "")]


def _intensity(hw: str, base: dict, by: dict, cfg: CompareConfig) -> list[str]:
    lines = []
    for o in cfg.optimizations:
        ratios = [by[(m, o)]["hardware"][hw]["intensity"] / b["hardware"][hw]["intensity"]
                  for m, b in base.items() if (m, o) in by and b["hardware"][hw]["intensity"]
                  and by[(m, o)]["hardware"][hw]["intensity"]]
        if ratios:
            lines.append(f"{o} changes arithmetic intensity (as it runs on {hw}) by a median {statistics.median(ratios):.2f}x "
                         f"over {len(ratios)} models (range {min(ratios):.2f}x to {max(ratios):.2f}x)")
    return lines


def _fastest(hw: str, base: dict, by: dict, cfg: CompareConfig) -> list[str]:
    picks = []
    for model, b in base.items():
        best, best_s = None, b["hardware"][hw]["roofline_s"]
        for o in cfg.optimizations:
            c = by.get((model, o))
            d = degradation(b, c) if c else None
            if c and d is not None and d <= TOLERANCE and c["hardware"][hw]["roofline_s"] < best_s:
                best, best_s = o, c["hardware"][hw]["roofline_s"]
        if best:
            picks.append(f"{model} {best} ({b['hardware'][hw]['roofline_s'] / best_s:.2f}x)")
    if not picks:
        return []
    return [f"on {hw}, the fastest roofline within {TOLERANCE * 100:.0f}% of the metric: {'; '.join(picks)}"]

"""The compare report (kiln.report): one table of the matrix, one of the rooflines, the plots
and the observations."""
from __future__ import annotations

from kiln.compare.config import BASELINE
from kiln.compare.observe import degradation, latency_here, ok, speedup, table
from kiln.report import Report


def _change(b: dict, c: dict):
    bv, cv = b.get("metric", {}).get("value"), c.get("metric", {}).get("value")
    return None if bv is None or cv is None else cv - bv


def render(results: dict) -> Report:
    cfg, cells = results["config"], results["cells"]
    base, by = table(cells)
    hw = cfg["hardware"]
    rep = Report("kiln compare", summary={"models": len(cfg["models"]), "optimizations": cfg["optimizations"],
                                          "hardware": hw, "cells_run": results["cells_run"],
                                          "cells_resumed": results["cells_resumed"],
                                          "latencies_added": results.get("latencies_added", 0),
                                          "wall_s": results["wall_s"]})
    _bases(rep, cells)
    sec = rep.section("Matrix", "Each optimisation of each model (trained as 'Base models' says), at batch 1. "
                      "Metric: `kiln eval` "
                      "of the artifact on the test split. Size: bytes of the saved artifact, and of the weights as "
                      "they run (number formats, sparse storage). FLOPs: dense, and as the artifact runs "
                      "(sparse kernels skip zeros). Latency: measured here with the backend `kiln compile` chose.")
    rows = []
    first = hw[0]
    for c in cells:
        b = base.get(c["model"])
        if not ok(c) or b is None:
            continue
        h = c["hardware"][first]
        lat = c.get("latency") or {}
        left = [x["module"] for x in (c.get("made") or {}).get("skipped", [])]
        rows.append([c["model"], c["optimization"], c["metric"].get("key"), c["metric"].get("value"),
                     _change(b, c), c["artifact_bytes"], c["weight_bytes"], c["flops"], h["flops"],
                     lat.get("latency_s"), lat.get("backend"), ", ".join(left) or None])
    sec.table(["model", "optimisation", "metric", "value", "change", "artifact bytes", "weight bytes",
               "FLOPs", "FLOPs as run", "latency here (s)", "backend", "left as it was"], rows)
    roof = rep.section("Roofline on each profile", "Roofline latency (s) and boundedness at batch 1; arithmetic "
                       "intensity (FLOP/byte as the artifact runs).")
    roof.table(["model", "optimisation", *[f"{h} s" for h in hw], *[f"{h} bound" for h in hw],
                *[f"{h} intensity" for h in hw]],
               [[c["model"], c["optimization"], *[c["hardware"][h]["roofline_s"] for h in hw],
                 *[c["hardware"][h]["bound"] for h in hw], *[c["hardware"][h]["intensity"] for h in hw]]
                for c in cells if ok(c)])
    _figures(rep.section("Plots"), cfg, base, by)
    obs = rep.section("Observations", "Computed from the cells by the rules in kiln/compare/observe.py.")
    for line in results["observations"]:
        obs.note(line)
    failed = [c for c in cells if not ok(c)]
    if failed:
        rep.section("Cells that failed").table(["model", "optimisation", "error"],
                                               [[c["model"], c["optimization"], c["error"]] for c in failed])
    return rep


def _bases(rep: Report, cells: list[dict]) -> None:
    """How each base model was trained (its recipe) and what it reached: the row every
    optimisation is read against."""
    rows = []
    for c in cells:
        if c["optimization"] != BASELINE:
            continue
        b, m = c.get("base") or {}, c.get("metric") or {}
        rows.append([c["model"], b.get("spec"), b.get("dataset") or "(the zoo's)", b.get("trained_steps"),
                     b.get("lr"), m.get("key"), m.get("value"), b.get("note") or m.get("note") or c.get("error")])
    rep.section("Base models", "Each model's base run: `kiln train` by its recipe (kiln.compare.config.RECIPES) "
                "from the zoo's weights (pretrained where the zoo has them), and its test metric.").table(
        ["model", "trained as", "dataset", "steps", "lr", "metric", "value", "note"], rows)


def _grid(cfg: dict, base: dict, by: dict, value) -> tuple[list[str], list[str], list[list[float | None]]]:
    models = [m for m in cfg["models"] if m in base]
    opts = cfg["optimizations"]
    return models, opts, [[value(base[m], by[(m, o)]) if (m, o) in by else None for o in opts] for m in models]


def _bars(section, name: str, title: str, ylabel: str, grid, log: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, opts, values = grid
    if not models or not any(v is not None and (v > 0 if log else True) for row in values for v in row):
        return   # nothing measured (latency off, no data): no empty plot
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(models) * max(1, len(opts)) / 3), 3.6))
    width = 0.8 / max(1, len(opts))
    for j, o in enumerate(opts):
        xs = [i + j * width for i in range(len(models))]
        ax.bar(xs, [v if v is not None else float("nan") for v in (row[j] for row in values)], width, label=o)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))], models, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.axhline(1.0 if log else 0.0, color="#444", lw=0.8)
    ax.legend(fontsize=7, ncol=min(4, len(opts)))
    section.figure(name, fig, title)


def _figures(section, cfg: dict, base: dict, by: dict) -> None:
    hw = cfg["hardware"]
    _bars(section, "metric_change", "Task metric change (relative; > 0 is worse)", "relative loss",
          _grid(cfg, base, by, lambda b, c: degradation(b, c)))
    _bars(section, "size", "Weight bytes as run, relative to the base model", "x of base",
          _grid(cfg, base, by, lambda b, c: c["weight_bytes"] / b["weight_bytes"]), log=True)
    _bars(section, "flops", "FLOPs as run, relative to the base model", "x of base",
          _grid(cfg, base, by, lambda b, c: c["hardware"][hw[0]]["flops"] / b["hardware"][hw[0]]["flops"]), log=True)
    _bars(section, "latency_here", "Speed-up measured on this CPU (batch 1)", "x faster",
          _grid(cfg, base, by, lambda b, c: speedup(latency_here(b), latency_here(c))), log=True)
    for h in hw:
        _bars(section, f"roofline_{h}", f"Roofline speed-up on {h} (batch 1)", "x faster",
              _grid(cfg, base, by, lambda b, c, h=h: speedup(b["hardware"][h]["roofline_s"],
                                                            c["hardware"][h]["roofline_s"])), log=True)
    _intensity(section, cfg, base, by)


def _intensity(section, cfg: dict, base: dict, by: dict) -> None:
    """Arithmetic intensity before and after, against each profile's ridge point."""
    import matplotlib.pyplot as plt

    h = next((x for x in cfg["hardware"] if x != "local"), cfg["hardware"][0])
    pts = [(b["hardware"][h]["intensity"], by[(m, o)]["hardware"][h]["intensity"], o)
           for m, b in base.items() for o in cfg["optimizations"] if (m, o) in by]
    pts = [p for p in pts if p[0] and p[1]]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for o in cfg["optimizations"]:
        xs = [p[0] for p in pts if p[2] == o]
        ax.scatter(xs, [p[1] for p in pts if p[2] == o], label=o, s=18)
    lo, hi = min(min(p[0], p[1]) for p in pts), max(max(p[0], p[1]) for p in pts)
    ax.plot([lo, hi], [lo, hi], color="#888", lw=0.8)
    ridge = next(iter(base.values()))["hardware"][h]["ridge"]
    ax.axhline(ridge, color="#c33", lw=0.8, ls="--", label=f"{h} fp32 ridge")
    ax.axvline(ridge, color="#c33", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"intensity before ({BASELINE}), FLOP/B")
    ax.set_ylabel("intensity after, FLOP/B")
    ax.legend(fontsize=7)
    section.figure("intensity", fig, f"Arithmetic intensity before and after, as run on {h}")

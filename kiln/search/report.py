"""What a finished (or interrupted) study leaves in its run directory.

results.json   every trial (state, params, values, what the space measured, fail reasons), the
               best trial or the Pareto front and its hypervolume
best/          trial-N/ for the best trial (single objective) or each front trial: params.json
               and the space's ready-to-run configs
report.md      the same in tables; report.html with the plots inline (SVG); PNGs beside them:
               best-so-far.png (single objective) or pareto.png and hypervolume.png
"""
from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

from kiln.io import atomic_write_json, atomic_write_text
from kiln.search.config import SearchConfig
from kiln.search.engine import SURPLUS
from kiln.search.objectives import Objective
from kiln.search.pareto import front_indices, hypervolume
from kiln.search.resume import RETRY_OF, is_interrupted

MAX_EXPORTS = 20


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(SURPLUS):    # created past the budget by a racing worker, never run
            continue
        rows.append({"number": t.number, "state": t.state.name, "interrupted": is_interrupted(t), "params": t.params,
                     "values": t.values, "seconds": t.duration.total_seconds() if t.duration else None,
                     "attrs": {k: v for k, v in t.user_attrs.items() if not k.startswith("partial_")}})
    return rows


def summarise(rows: list[dict], cfg: SearchConfig, objectives: list[Objective]) -> dict:
    """Best trial, or Pareto front and hypervolume (with its running curve), from trial rows."""
    done = [r for r in rows if r["state"] == "COMPLETE"]
    directions = [o.direction for o in objectives]
    counts = {s: sum(r["state"] == s and not r["interrupted"] for r in rows)
              for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    # an interrupted trial ran again as a retry: the budget counts the retry, not both
    runs = {"interrupted": sum(r["interrupted"] for r in rows), "retried": sum(RETRY_OF in r["attrs"] for r in rows)}
    out = {"study": cfg.study, "objectives": [o.name for o in objectives], "directions": directions,
           "sampler": cfg.sampler, "trials": len(rows) - runs["interrupted"], "states": counts, **runs}
    if not done:
        return out | {"best": [], "hypervolume": None}
    if len(objectives) == 1:
        pick = max if directions[0] == "max" else min
        best = pick(done, key=lambda r: r["values"][0])
        curve, running = [], None
        for r in done:
            v = r["values"][0]
            running = v if running is None else pick(running, v)
            curve.append([r["number"], running])
        return out | {"best": [best["number"]], "best_values": best["values"], "best_so_far": curve}
    points = [r["values"] for r in done]
    front = [done[i]["number"] for i in front_indices(points, directions)]
    out |= {"best": front, "front": [r["values"] for r in done if r["number"] in front]}
    if cfg.reference:
        curve = [[r["number"], hypervolume(points[:i + 1], directions, cfg.reference)]
                 for i, r in enumerate(done)]
        out |= {"reference": list(cfg.reference), "hypervolume": curve[-1][1], "hypervolume_curve": curve}
    return out


def write_report(study, cfg: SearchConfig, space, objectives: list[Objective], out: Path) -> dict:
    rows = trial_rows(study)
    summary = summarise(rows, cfg, objectives)
    by_number = {r["number"]: r for r in rows}
    best_dir = out / "best"
    if best_dir.exists():
        shutil.rmtree(best_dir)
    exported = {}
    for n in summary["best"][:MAX_EXPORTS]:
        d = best_dir / f"trial-{n}"
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / "params.json", {"params": by_number[n]["params"], "values": by_number[n]["values"]})
        exported[n] = [str(p) for p in space.export(by_number[n]["params"], d)]
    summary["exported"] = exported
    plots = _plots(summary, rows, objectives, out)
    atomic_write_json(out / "results.json", summary | {"trials_detail": rows})
    atomic_write_text(out / "report.md", _markdown(summary, rows, objectives))
    atomic_write_text(out / "report.html", _html(summary, rows, objectives, plots))
    return summary


def _plots(summary: dict, rows: list[dict], objectives: list[Objective], out: Path) -> dict[str, str]:
    """PNG files beside the report and the same figures as SVG text for the HTML."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    if "best_so_far" in summary:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        done = [r for r in rows if r["state"] == "COMPLETE"]
        ax.scatter([r["number"] for r in done], [r["values"][0] for r in done], s=10, alpha=0.5, label="trial")
        xs, ys = zip(*summary["best_so_far"])
        ax.step(xs, ys, where="post", color="C3", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(objectives[0].name)
        ax.legend()
        figures["best-so-far"] = fig
    if "front" in summary:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        done = [r for r in rows if r["state"] == "COMPLETE"]
        ax.scatter([r["values"][1] for r in done], [r["values"][0] for r in done], s=10, alpha=0.4, label="trial")
        front = sorted(summary["front"], key=lambda v: v[1])
        ax.step([v[1] for v in front], [v[0] for v in front], where="post", color="C3", marker="o", ms=4,
                label="Pareto front")
        ax.set_xlabel(objectives[1].name)
        ax.set_ylabel(objectives[0].name)
        ax.legend()
        figures["pareto"] = fig
    if "hypervolume_curve" in summary:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs, ys = zip(*summary["hypervolume_curve"])
        ax.plot(xs, ys)
        ax.set_xlabel("trial")
        ax.set_ylabel(f"hypervolume (ref {summary['reference']})")
        figures["hypervolume"] = fig
    svgs = {}
    for name, fig in figures.items():
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        svgs[name] = buf.getvalue()[buf.getvalue().find("<svg"):]
        plt.close(fig)
    return svgs


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return "-" if v is None else str(v)


def _table(rows: list[dict], objectives: list[Objective], only: list[int] | None = None) -> list[list[str]]:
    head = ["trial", "state", *[o.name for o in objectives], "seconds", "note"]
    body = []
    for r in rows:
        if only is not None and r["number"] not in only:
            continue
        vals = r["values"] or [None] * len(objectives)
        dup = r["attrs"].get("duplicate_of")
        note = r["attrs"].get("fail_reason") or r["attrs"].get("pruned") or (f"same as trial {dup}" if dup is not None else "")
        body.append([str(r["number"]), r["state"], *[_fmt(v) for v in vals], _fmt(r["seconds"]), note])
    return [head, *body]


def _md_table(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table[1:]])


def _headline(summary: dict) -> list[str]:
    lines = [f"study {summary['study']}: {summary['trials']} trials {summary['states']}, sampler {summary['sampler']}"]
    if summary.get("interrupted"):
        lines.append(f"{summary['interrupted']} trial(s) interrupted by a stop or kill, "
                     f"{summary['retried']} run again (counted once)")
    if summary.get("hypervolume") is not None:
        lines.append(f"hypervolume {summary['hypervolume']:.6g} (reference {summary['reference']})")
    if "best_values" in summary:
        lines.append(f"best trial {summary['best'][0]}: {_fmt(summary['best_values'])}")
    return lines


def _markdown(summary: dict, rows: list[dict], objectives: list[Objective]) -> str:
    parts = ["# Search report", "", *_headline(summary), "",
             "## Best" if len(objectives) == 1 else "## Pareto front", "",
             _md_table(_table(rows, objectives, summary["best"])), "", "## All trials", "",
             _md_table(_table(rows, objectives))]
    return "\n".join(parts) + "\n"


def _html(summary: dict, rows: list[dict], objectives: list[Objective], svgs: dict[str, str]) -> str:
    def table(t):
        head = "".join(f"<th>{html.escape(c)}</th>" for c in t[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in t[1:])
        return f"<table><tr>{head}</tr>{body}</table>"

    parts = ["<!doctype html><meta charset='utf-8'><title>kiln search</title>",
             "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style>",
             "<h1>Search report</h1>", *[f"<p>{html.escape(line)}</p>" for line in _headline(summary)],
             *svgs.values(), "<h2>Best</h2>", table(_table(rows, objectives, summary["best"])),
             "<h2>All trials</h2>", table(_table(rows, objectives)),
             f"<script type='application/json' id='summary'>{html.escape(json.dumps(summary))}</script>"]
    return "\n".join(parts) + "\n"

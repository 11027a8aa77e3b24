"""Draw a graph as SVG: Graphviz `dot` when installed, else kiln's own layered layout.

Nodes are coloured by roofline bound (compute red, memory blue, views grey) or by cost
(white to red by share of the model's latency: measured where available, else roofline).
"""
from __future__ import annotations

import html
import math
import shutil
import subprocess
from typing import Literal

from kiln.graph.node import NodeKind

ColorBy = Literal["bound", "cost"]
BOUND_COLORS = {"compute": "#f4a582", "memory": "#92c5de", "none": "#eeeeee"}


def _colors(rows: list[dict], color_by: ColorBy) -> dict[str, str]:
    if color_by == "bound":
        return {r["name"]: BOUND_COLORS[r["bound"]] for r in rows}
    key = "measured_s" if all(r.get("measured_s") is not None for r in rows) else "roofline_s"
    total = sum(r[key] or 0.0 for r in rows) or 1.0
    out = {}
    for r in rows:
        share = (r[key] or 0.0) / total
        heat = min(1.0, math.sqrt(share * 10))   # sqrt spreads the many small ops apart
        g = int(255 - 200 * heat)
        out[r["name"]] = f"#ff{g:02x}{g:02x}"
    return out


def _label(r: dict) -> str:
    shape = "x".join(map(str, r["shape"])) or "scalar"
    return f"{r['op']}\n{shape}\n{r['module'] or '(root)'}"


def _elements(graph, rows: list[dict]):
    """(node ids with labels, edges) over inputs, ops and the output; weights are left out."""
    keep = {n.name for n in graph.nodes if n.kind in (NodeKind.INPUT, NodeKind.OP, NodeKind.OUTPUT)}
    labels = {n.name: (n.name if n.kind is not NodeKind.OP else None) for n in graph.nodes if n.name in keep}
    for r in rows:
        labels[r["name"]] = _label(r)
    edges = [(a, n.name) for n in graph.nodes if n.name in keep for a in n.inputs if a in keep]
    return labels, edges


def to_dot(graph, rows: list[dict], color_by: ColorBy = "bound") -> str:
    colors = _colors(rows, color_by)
    labels, edges = _elements(graph, rows)
    lines = ["digraph kiln {", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=9, fillcolor="#ffffff"];']
    for name, label in labels.items():
        text = label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        lines.append(f'  "{name}" [label="{text}", fillcolor="{colors.get(name, "#ffffff")}"];')
    lines += [f'  "{a}" -> "{b}";' for a, b in edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_svg(graph, rows: list[dict], color_by: ColorBy = "bound") -> str:
    """SVG text of the graph; uses Graphviz when `dot` is on PATH."""
    dot = shutil.which("dot")
    if dot:
        done = subprocess.run([dot, "-Tsvg"], input=to_dot(graph, rows, color_by), capture_output=True,
                              text=True, timeout=120)
        if done.returncode == 0:
            return done.stdout
    return _layered_svg(graph, rows, color_by)


def _layered_svg(graph, rows: list[dict], color_by: ColorBy) -> str:
    colors = _colors(rows, color_by)
    labels, edges = _elements(graph, rows)
    preds: dict[str, list[str]] = {n: [] for n in labels}
    for a, b in edges:
        preds[b].append(a)
    layer: dict[str, int] = {}
    for name in labels:   # graph order is topological
        layer[name] = 1 + max((layer[p] for p in preds[name]), default=-1)
    rows_by_layer: dict[int, list[str]] = {}
    for name, k in layer.items():
        rows_by_layer.setdefault(k, []).append(name)
    w, h, gx, gy = 170, 46, 20, 30
    pos = {name: (gx + i * (w + gx), gy + k * (h + gy))
           for k, names in rows_by_layer.items() for i, name in enumerate(names)}
    width = gx + max(len(v) for v in rows_by_layer.values()) * (w + gx)
    height = gy + (max(rows_by_layer) + 1) * (h + gy)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="Helvetica" font-size="9">']
    for a, b in edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        out.append(f'<line x1="{xa + w / 2}" y1="{ya + h}" x2="{xb + w / 2}" y2="{yb}" stroke="#888"/>')
    for name, label in labels.items():
        x, y = pos[name]
        out.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" '
                   f'fill="{colors.get(name, "#ffffff")}" stroke="#444"><title>{html.escape(name)}</title></rect>')
        for i, text in enumerate(label.split("\n")[:3]):
            out.append(f'<text x="{x + w / 2}" y="{y + 13 + 12 * i}" text-anchor="middle">'
                       f'{html.escape(text[:32])}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"

"""Reports a person reads: one page of sections, tables and figures, written as HTML, Markdown
and JSON together.

    rep = Report("kiln compare", summary={"models": 10})
    sec = rep.section("Latency", "Measured on this CPU with the best backend.")
    sec.table(["model", "ms"], [["zoo:cnn", 0.41]])
    sec.figure("latency", fig)          # a matplotlib Figure: inline SVG in the HTML, PNG beside it
    sec.note("int8 gains 2.1x on the CNN")
    rep.write(out_dir)                  # report.html, report.md, report.json (+ figures/*.png)

The HTML is self-contained (styles and SVG inline, no scripts fetched), so it opens offline;
`report.json` holds the summary and every table as data. Writes are atomic, file by file.
"""
from __future__ import annotations

import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from kiln.io import atomic_write, atomic_write_json, atomic_write_text

STYLE = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
         "table{border-collapse:collapse;margin:0.5rem 0 1rem}td,th{padding:3px 10px;border-bottom:1px solid #ddd;"
         "text-align:left}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}"
         "figure{margin:1rem 0}figcaption{font-size:90%;color:#555}li{margin:0.2rem 0}")


def cell_text(value) -> str:
    """How a table cell reads: floats to 4 significant digits, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass
class Table:
    columns: list[str]
    rows: list[list]
    caption: str = ""


@dataclass
class Figure:
    name: str
    svg: str
    png: bytes
    caption: str = ""


@dataclass
class Section:
    title: str
    text: str = ""
    items: list = field(default_factory=list)    # Table | Figure | str (a note, rendered as a list item)

    def table(self, columns, rows, caption: str = "") -> Table:
        t = Table([str(c) for c in columns], [list(r) for r in rows], caption)
        self.items.append(t)
        return t

    def figure(self, name: str, fig, caption: str = "") -> Figure:
        """Keep a matplotlib figure as SVG (for the page) and PNG (beside it), then close it."""
        import matplotlib.pyplot as plt

        svg, png = io.StringIO(), io.BytesIO()
        fig.savefig(svg, format="svg", bbox_inches="tight")
        fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        text = svg.getvalue()
        f = Figure(name, text[text.find("<svg"):], png.getvalue(), caption)
        self.items.append(f)
        return f

    def note(self, text: str) -> None:
        self.items.append(str(text))


@dataclass
class Report:
    title: str
    summary: dict = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)

    def section(self, title: str, text: str = "") -> Section:
        s = Section(title, text)
        self.sections.append(s)
        return s

    def to_dict(self) -> dict:
        def item(i):
            if isinstance(i, Table):
                return {"table": {"columns": i.columns, "rows": i.rows, "caption": i.caption}}
            if isinstance(i, Figure):
                return {"figure": f"figures/{i.name}.png", "caption": i.caption}
            return {"note": i}
        return {"title": self.title, "summary": self.summary,
                "sections": [{"title": s.title, "text": s.text, "items": [item(i) for i in s.items]}
                             for s in self.sections]}

    def html(self) -> str:
        e = html.escape
        parts = ["<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
                 f"<title>{e(self.title)}</title><style>{STYLE}</style></head><body>", f"<h1>{e(self.title)}</h1>"]
        for s in self.sections:
            parts.append(f"<h2>{e(s.title)}</h2>")
            if s.text:
                parts.append(f"<p>{e(s.text)}</p>")
            notes = []
            for i in s.items:
                if isinstance(i, str):
                    notes.append(f"<li>{e(i)}</li>")
                    continue
                if notes:
                    parts.append("<ul>" + "".join(notes) + "</ul>")
                    notes = []
                if isinstance(i, Table):
                    head = "".join(f"<th>{e(c)}</th>" for c in i.columns)
                    body = "".join(
                        "<tr>" + "".join(f"<td class='num'>{e(cell_text(v))}</td>" if isinstance(v, (int, float))
                                         and not isinstance(v, bool) else f"<td>{e(cell_text(v))}</td>"
                                         for v in row) + "</tr>" for row in i.rows)
                    cap = f"<caption>{e(i.caption)}</caption>" if i.caption else ""
                    parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
                else:
                    cap = f"<figcaption>{e(i.caption)}</figcaption>" if i.caption else ""
                    parts.append(f"<figure id='{e(i.name)}'>{i.svg}{cap}</figure>")
            if notes:
                parts.append("<ul>" + "".join(notes) + "</ul>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for s in self.sections:
            lines += [f"## {s.title}", ""] + ([s.text, ""] if s.text else [])
            for i in s.items:
                if isinstance(i, Table):
                    lines += ["| " + " | ".join(i.columns) + " |", "|" + "---|" * len(i.columns)]
                    lines += ["| " + " | ".join(cell_text(v) for v in row) + " |" for row in i.rows]
                    lines += [f"*{i.caption}*" if i.caption else "", ""]
                elif isinstance(i, Figure):
                    lines += [f"![{i.caption or i.name}](figures/{i.name}.png)", ""]
                else:
                    lines.append(f"- {i}")
            lines.append("")
        return "\n".join(lines)

    def write(self, out: str | Path) -> Path:
        """report.html, report.md, report.json and figures/NAME.png under `out`; returns the HTML's path."""
        out = Path(out)
        for s in self.sections:
            for i in s.items:
                if isinstance(i, Figure):
                    (out / "figures").mkdir(parents=True, exist_ok=True)
                    atomic_write(out / "figures" / f"{i.name}.png", lambda p, data=i.png: Path(p).write_bytes(data))
        atomic_write_json(out / "report.json", self.to_dict())
        atomic_write_text(out / "report.md", self.markdown())
        return atomic_write_text(out / "report.html", self.html())

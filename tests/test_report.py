"""kiln.report: one page in HTML, Markdown and JSON with the same content."""
import json
from html.parser import HTMLParser

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kiln.report import Report, cell_text  # noqa: E402


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.open, self.seen = [], []

    def handle_starttag(self, tag, attrs):
        self.seen.append(tag)
        if tag not in {"meta", "br", "hr", "img", "path", "use", "rect", "stop", "line", "circle", "polyline"}:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if tag in self.open:
            while self.open.pop() != tag:
                pass


def test_report_writes_the_same_content_three_ways(tmp_path):
    rep = Report("kiln <compare>", summary={"models": 2})
    sec = rep.section("Latency", "Measured & compared.")
    sec.table(["model", "ms", "ok"], [["zoo:cnn", 0.123456, True], ["zoo:gpt", None, False]], caption="batch 1")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 2])
    sec.figure("lat", fig, caption="a line")
    sec.note("int8 gains 2.1x")
    html_path = rep.write(tmp_path)

    page = html_path.read_text()
    assert "kiln &lt;compare&gt;" in page and "Measured &amp; compared." in page
    assert "<svg" in page and "0.1235" in page and "<li>int8 gains 2.1x</li>" in page
    tags = _Tags()
    tags.feed(page)
    assert {"table", "figure", "svg", "h2"} <= set(tags.seen) and tags.open == []
    assert (tmp_path / "figures" / "lat.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["summary"] == {"models": 2}
    assert data["sections"][0]["items"][0]["table"]["rows"][1] == ["zoo:gpt", None, False]
    assert data["sections"][0]["items"][1]["figure"] == "figures/lat.png"
    md = (tmp_path / "report.md").read_text()
    assert "| zoo:cnn | 0.1235 | yes |" in md and "![a line](figures/lat.png)" in md


def test_cell_text():
    assert [cell_text(v) for v in (None, True, 3, 2.0 / 3, "x")] == ["-", "yes", "3", "0.6667", "x"]

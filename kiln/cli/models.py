"""`kiln models`: the zoo, with each model's family, task, dataset and default input."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kiln.cli.common import console, si, user_errors, validate, write_json


@user_errors
def models(
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the list as JSON here."),
) -> None:
    """List the zoo models (from their registered metadata: nothing is built)."""
    from kiln.models.zoo import entries

    validate(json_path=json_path)
    rows = [{"name": e.name, "spec": f"zoo:{e.name}", "family": e.family, "task": e.task, "dataset": e.dataset,
             "default_input": e.default_input, "params": e.params, "description": e.description}
            for e in entries()]
    table = Table(title="kiln zoo")
    for col in ("spec", "family", "task", "params", "dataset", "default input"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for r in rows:
        table.add_row(r["spec"], r["family"], r["task"], si(r["params"]), r["dataset"], r["default_input"])
    console.print(table)
    presets = _presets()
    console.print("Other specs: hf:PATH (local HF directory), hf-config:MODEL_TYPE[?key=value&...], py:FILE.py:FACTORY")
    if json_path:
        write_json(json_path, {"models": rows, "presets": presets})


def _presets() -> list[dict]:
    """The published configurations (`preset:NAME`, kiln.models.presets), with their sources."""
    from kiln.models.presets import PRESETS

    rows = [{"spec": f"preset:{name}", "model_type": p.model_type, "params": p.params,
             "default_input": f"1x{p.length}" if p.inputs == "text" else f"1x3x{p.length}x{p.length}",
             "source": p.source, "note": p.note} for name, p in PRESETS.items()]
    table = Table(title="presets: published configurations at full size (analysed without weights)")
    for col in ("spec", "type", "params", "default input", "source"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for r in rows:
        table.add_row(r["spec"], r["model_type"], si(r["params"]), r["default_input"], r["source"])
    console.print(table)
    return rows

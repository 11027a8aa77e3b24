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
    console.print("Other specs: hf:PATH (local HF directory), hf-config:MODEL_TYPE[?key=value&...], py:FILE.py:FACTORY")
    if json_path:
        write_json(json_path, {"models": rows})

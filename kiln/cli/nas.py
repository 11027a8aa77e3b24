"""`kiln nas METHOD`: neural architecture search (DARTS, SPOS, REINFORCE, regularized evolution,
random search), then retraining of the found architecture."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli.common import console, err_console, user_errors, validate, write_json


def print_result(result) -> None:
    arch = result.architecture
    if arch["kind"] == "cell":
        for cell in ("normal", "reduce"):
            table = Table(title=f"{cell} cell")
            table.add_column("node")
            table.add_column("edges (op <- state; 0, 1 = cell inputs)")
            for j, node in enumerate(arch["genotype"][cell]):
                table.add_row(str(j + 2), ",  ".join(f"{op} <- {i}" for op, i in node))
            console.print(table)
    else:
        console.print("path: " + " -> ".join(arch["blocks"]))
    table = Table(title=f"kiln nas {result.method}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in {**{f"search {k}": v for k, v in result.search.items() if k not in ("alphas", "warnings")},
                       **result.metrics}.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    for warning in result.search.get("warnings", []):     # too little search to mean anything
        err_console.print(f"[yellow]warning: {escape(warning)}[/yellow]")


@user_errors
def nas(
    method: str = typer.Argument(..., help="darts | spos | rl | evolution | random (kiln.search.nas.run.METHODS)"),
    config: Optional[Path] = typer.Option(None, "--config", help="NAS config TOML (configs/nas/*.toml); "
                                          "default: the method's defaults."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory: architecture.json, metrics.json, "
                                       "search.json, history.json, config.toml, model.safetensors."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the architecture, search summary "
                                             "and metrics here."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Search an architecture, retrain it from scratch, report val/test accuracy."""
    from kiln.search.nas.run import load_config, run_method, write_run

    validate(new_dirs=[out], json_path=json_path)
    cfg = load_config(method, config)
    result = run_method(method, cfg, progress)
    print_result(result)
    if out:
        write_run(out, result, cfg)
        console.print(f"run: {out}")
    if json_path:
        write_json(json_path, {"method": method, "architecture": result.architecture,
                                      "search": result.search, "metrics": result.metrics})

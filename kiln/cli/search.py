"""`kiln search`: run or resume a study from a search config."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from kiln.cli.common import console, err_console, user_errors, validate, write_json


@user_errors
def search(
    config: Path = typer.Option(..., "--config", help="Search config TOML (space, objectives, sampler, trials)."),
    out: Path = typer.Option(..., "--out", help="Run directory (the study, best configs, report); run again to resume."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL: sqlite:///PATH, postgresql://..., journal:PATH."),
    workers: Optional[int] = typer.Option(None, help="Worker processes on this machine, one thread each."),
    trials: Optional[int] = typer.Option(None, help="Override the config's trial budget."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the summary here."),
) -> None:
    """Search a space with Optuna (TPE, NSGA-II, random, grid, QMC); single or multi-objective."""
    from kiln.search.config import load_search_config
    from kiln.search.run import run_search

    validate(positive={"--workers": workers, "--trials": trials}, out_dirs=[out], json_path=json_path)
    cfg = load_search_config(config)
    overrides = {k: v for k, v in (("storage", storage), ("workers", workers), ("trials", trials)) if v is not None}
    if overrides:
        from kiln.search.config import parse_search_config

        cfg = parse_search_config(dataclasses.asdict(cfg) | overrides, str(config))
    summary = run_search(cfg, out, log=lambda s: err_console.print(f"[dim]{s}[/dim]"))
    _print(summary)
    console.print(f"run: {out} (report.html, best/)")
    if json_path:
        write_json(json_path, summary)


def _print(summary: dict) -> None:
    from rich.table import Table

    from kiln.search.report import _headline

    for line in _headline(summary):
        console.print(line)
    rows = summary.get("front") or ([summary["best_values"]] if "best_values" in summary else [])
    if not rows:
        return
    table = Table(title="Pareto front" if "front" in summary else "best trial")
    table.add_column("trial", justify="right")
    for name in summary["objectives"]:
        table.add_column(name, justify="right")
    for n, values in zip(summary["best"], rows):
        table.add_row(str(n), *[f"{v:.5g}" for v in values])
    console.print(table)

"""`kiln early-exit`: exit heads at chosen depths, trained jointly, and the threshold sweep."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kiln.cli.common import check_fits, console, err_console, si, user_errors, validate, write_json


def print_report(report: dict) -> None:
    table = Table(title="exits (FLOPs per sample to leave there, heads before it included)")
    for col in ("exit", "head params", "FLOPs", "test accuracy"):
        table.add_column(col, justify="left" if col == "exit" else "right")
    for row in report["exits"]:
        table.add_row(row["exit"], f"{row['head_params']:,}", si(row["flops"]), f"{row['test_accuracy']:.4f}")
    console.print(table)
    curve = Table(title=f"accuracy against average FLOPs per sample ({report['criterion']} threshold, test split)")
    for col in ("threshold", "accuracy", "avg FLOPs", "saved", "exit shares"):
        curve.add_column(col, justify="right")
    for p in report["curve"]:
        mark = " *" if p["threshold"] == report["threshold"] else ""
        curve.add_row(f"{p['threshold']:.4g}{mark}", f"{p['accuracy']:.4f}", si(p["avg_flops"]), f"{p['flops_saved']:.1%}",
                      " ".join(f"{f:.2f}" for f in p["exit_fractions"]))
    console.print(curve)
    from kiln.timing import format_timing   # (torch: kept out of the CLI's start-up)

    c, d, lat = report["chosen"], report["dense"], report["latency"]
    console.print(f"threshold {report['threshold']:.4g} ({report['threshold_from']}): accuracy {c['accuracy']:.4f} vs "
                  f"{d['accuracy']:.4f} dense, {si(c['avg_flops'])} vs {si(d['flops'])} FLOPs per sample "
                  f"({c['flops_saved']:.1%} fewer)")
    console.print(f"latency per sample at batch 1 ({lat['threads']} threads, {lat['samples']} samples, interleaved, "
                  f"median of {lat['repeats']}): dense {format_timing(lat['dense'])}, early exit "
                  f"{format_timing(lat['early_exit'])} ({lat['speedup']:.2f}x)")
    if lat["timing_note"]:
        console.print(f"[yellow]timing: {lat['timing_note']}[/yellow]")


@user_errors
def early_exit(
    src: str = typer.Argument(..., help="A model spec or a kiln run directory (not a quantized one: quantize last)."),
    config: Path = typer.Option(..., "--config", help="Early-exit config TOML (exits, criterion, threshold, train)."),
    out: Path = typer.Option(..., help="Run directory to write (must not exist or be empty)."),
    dataset: Optional[str] = typer.Option(None, help="Training and evaluation dataset; default: the source's."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write metrics and report here."),
) -> None:
    """Attach exit heads at chosen blocks, train them, and sweep the exit threshold: accuracy
    against exact average FLOPs per sample, and measured latency before and after."""
    from kiln.adapt.config import parse_config
    from kiln.adapt.run import early_exit_run
    from kiln.config import read_toml

    validate(new_dirs=[out], json_path=json_path)
    check_fits(src, dataset)
    cfg = parse_config(read_toml(config), str(config))
    result = early_exit_run(src, cfg, out, dataset, log=lambda s: err_console.print(f"[dim]{s}[/dim]"))
    print_report(result["report"])
    console.print(f"run: {out}")
    if json_path:
        write_json(json_path, {"metrics": result["metrics"], "report": result["report"]})

"""`kiln lowrank`: truncated SVD of Linear layers and Tucker-2 of Conv2d layers, then fine-tuning."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kiln.cli.common import check_fits, console, err_console, si, user_errors, validate, write_json


def print_report(report: dict, metrics: dict) -> None:
    table = Table(title="per-layer factorisation (FLOPs for one example sample)")
    for col in ("layer", "type", "rank", "params", "params after", "FLOPs", "FLOPs after", "note"):
        table.add_column(col, justify="left" if col in ("layer", "type", "note") else "right")
    for row in report["layers"]:
        done = row["ranks"] is not None
        table.add_row(row["fqn"], row["type"], "x".join(map(str, row["ranks"])) if done else "-",
                      f"{row['params_before']:,}", f"{row['params_after']:,}" if done else "-",
                      si(row.get("flops_before")), si(row.get("flops_after")), row["reason"])
    console.print(table)
    console.print(f"parameters {report['params_before']:,} -> {report['params_after']:,} "
                  f"({report['params_after'] / report['params_before']:.1%}); FLOPs {si(report['flops_before'])} -> "
                  f"{si(report['flops_after'])} per sample")
    from kiln.timing import format_timing   # (torch: kept out of the CLI's start-up)

    lat = report["latency"]
    console.print(f"latency at batch {lat['batch']} ({lat['threads']} threads, interleaved, median of {lat['repeats']}): "
                  f"dense {format_timing(lat['dense'])}, low-rank {format_timing(lat['lowrank'])} ({lat['speedup']:.2f}x)")
    if lat["timing_note"]:
        console.print(f"[yellow]timing: {lat['timing_note']}[/yellow]")
    if "metric" in metrics:
        line = f"test {metrics['metric']}: dense {metrics['before']:.4f}  factorised {metrics['after']:.4f}"
        if "after_finetune" in metrics:
            line += f"  fine-tuned {metrics['after_finetune']:.4f}"
        console.print(line)


@user_errors
def lowrank(
    src: str = typer.Argument(..., help="A model spec or a kiln run directory (not a quantized one: quantize last)."),
    config: Path = typer.Option(..., "--config", help="Low-rank config TOML (budget/energy/rank, rules, finetune)."),
    out: Path = typer.Option(..., help="Run directory to write (must not exist or be empty)."),
    dataset: Optional[str] = typer.Option(None, help="Evaluation and fine-tuning dataset; default: the source's."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Measure dense and factorised on the test split."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write metrics and report here."),
) -> None:
    """Factorise a model's Linear (SVD) and Conv2d (Tucker-2) layers; report ranks, parameters,
    FLOPs and measured latency before and after."""
    from kiln.lowrank.config import parse_config
    from kiln.lowrank.run import lowrank_run
    from kiln.config import read_toml

    validate(new_dirs=[out], json_path=json_path)
    check_fits(src, dataset)
    cfg = parse_config(read_toml(config), str(config))
    result = lowrank_run(src, cfg, out, dataset, evaluate, log=lambda s: err_console.print(f"[dim]{s}[/dim]"))
    print_report(result["report"], result["metrics"])
    console.print(f"run: {out}")
    if json_path:
        write_json(json_path, {"metrics": result["metrics"], "report": result["report"]})

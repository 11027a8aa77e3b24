"""`kiln prune`: unstructured, N:M or structured pruning of a spec, run or artifact, with optional
fine-tuning (and distillation from the unpruned model), into an artifact run directory."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kiln.cli.common import console, err_console, si, check_fits, user_errors, validate, write_json

QUICK = ("method", "criterion", "scope", "ratio", "schedule", "seed", "keep_masks")


def _config(config: Optional[Path], given: dict, nm: Optional[str], finetune: dict):
    from kiln.config import read_toml
    from kiln.errors import KilnError
    from kiln.prune.config import parse_config

    table = read_toml(config) if config else {}
    table |= {k: v for k, v in given.items() if v is not None}
    if nm is not None:
        n, sep, m = nm.partition(":")
        if not sep or not n.isdigit() or not m.isdigit():
            raise KilnError(f"--nm needs N:M (e.g. 2:4), got {nm!r}")
        table |= {"n": int(n), "m": int(m)} | ({} if given.get("method") else {"method": "nm"})
    extra = {k: v for k, v in finetune.items() if v is not None}
    if extra:
        table["finetune"] = dict(table.get("finetune") or {}) | extra
    return parse_config(table, str(config) if config else "prune options")


def print_report(report: dict, metrics: dict) -> None:
    structured = report["method"] == "structured"
    table = Table(title=f"{report['method']} pruning")
    for col in ("module", "in", "out", "params") if structured else ("module", "zeros", "total", "sparsity"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for row in report["layers"]:
        if structured:
            table.add_row(row["module"], *(f"{row[k][0]:,} -> {row[k][1]:,}" for k in ("in", "out", "params")))
        else:
            table.add_row(row["module"], f"{row['zeros']:,}", f"{row['total']:,}", f"{row['sparsity']:.3f}")
    console.print(table)
    for s in report["skipped"]:
        console.print(f"skipped {s['module']}: {s['reason']}")
    from kiln.timing import format_timing   # (torch: kept out of the CLI's start-up)

    b, a = report["before"], report["after"]
    console.print(f"params {si(b['params'])} -> {si(a['params'])} (non-zero {si(b['nonzero_params'])} -> "
                  f"{si(a['nonzero_params'])}); weights {si(b['dense_bytes'])}B -> {si(a['dense_bytes'])}B dense, "
                  f"{si(a['sparse_bytes'])}B as non-zeros + bitmask; FLOPs {si(b['flops'])} -> {si(a['flops'])} with "
                  f"dense kernels, {si(b['effective_flops'])} -> {si(a['effective_flops'])} skipping zero weights; "
                  f"latency {format_timing(b['latency'])} -> {format_timing(a['latency'])} "
                  f"(interleaved, median of {a['latency_repeats']}, {a['threads']} threads)")
    if a["timing_note"]:
        console.print(f"[yellow]timing: {a['timing_note']}[/yellow]")
    if "metric" in metrics:
        line = f"test {metrics['metric']}: dense {metrics['before']:.4f}"
        if metrics["after"] is not None:
            line += f"  pruned {metrics['after']:.4f}"
        if "after_finetune" in metrics:
            line += f"  fine-tuned {metrics['after_finetune']:.4f}"
        console.print(line)


@user_errors
def prune(
    src: str = typer.Argument(..., help="A model spec or a kiln run directory (not a quantized one: quantize last)."),
    out: Path = typer.Option(..., help="Run directory to write (must not exist or be empty)."),
    config: Optional[Path] = typer.Option(None, help="Prune config TOML; the flags below override it."),
    dataset: Optional[str] = typer.Option(None, help="Dataset for scores, fine-tuning and evaluation; default: the source's."),
    method: Optional[str] = typer.Option(None, help="unstructured, nm or structured"),
    criterion: Optional[str] = typer.Option(None, help="magnitude, random, snip, movement (structured: l1, ...)"),
    scope: Optional[str] = typer.Option(None, help="global or local"),
    ratio: Optional[float] = typer.Option(None, help="Fraction removed, in [0, 1)."),
    nm: Optional[str] = typer.Option(None, help="N:M sparsity, e.g. 2:4 (implies --method nm)."),
    schedule: Optional[str] = typer.Option(None, help="oneshot, agp or lottery"),
    seed: Optional[int] = typer.Option(None),
    keep_masks: Optional[bool] = typer.Option(None, "--keep-masks/--permanent", help="Save masks as parametrizations."),
    epochs: Optional[int] = typer.Option(None, help="Fine-tune for this many epochs."),
    lr: Optional[float] = typer.Option(None, help="Fine-tuning learning rate."),
    max_steps: Optional[int] = typer.Option(None, help="Fine-tuning step limit."),
    distill: Optional[bool] = typer.Option(None, "--distill/--no-distill", help="Distil from the unpruned model."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Measure the test metric before and after."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write metrics and report here."),
) -> None:
    """Prune a model and report per-layer sparsity, parameters, FLOPs and latency before and after."""
    from kiln.prune.run import prune_run

    validate(positive={"--epochs": epochs, "--lr": lr}, non_negative={"--max-steps": max_steps},
             new_dirs=[out], json_path=json_path)
    check_fits(src, dataset)
    local = dict(locals())
    cfg = _config(config, {k: local[k] for k in QUICK}, nm,
                  {"epochs": epochs, "lr": lr, "max_steps": max_steps, "distill": distill})
    result = prune_run(src, cfg, out, dataset, evaluate, log=lambda s: err_console.print(f"[dim]{s}[/dim]"))
    print_report(result["report"], result["metrics"])
    console.print(f"run: {out}")
    if json_path:
        write_json(json_path, result)

"""`kiln quantize`: post-training quantization of a model spec or a trained run."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kiln.cli.common import console, err_console, check_fits, user_errors, validate, write_json


def _db(v) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.1f}"


def print_report(report: dict, metrics: dict) -> None:
    table = Table(title="per-layer quantization (SQNR against fp32, dB)")
    for col in ("layer", "type", "weight", "input", "output", "bits", "weight SQNR", "output SQNR"):
        table.add_column(col, justify="right" if col in ("bits", "weight SQNR", "output SQNR") else "left")
    for row in report["layers"]:
        table.add_row(row["name"], row["type"], row["weight"], row["input"], row["output"],
                      "-" if row["weight_bits"] is None else f"{row['weight_bits']:g}",
                      _db(row["weight_sqnr_db"]), _db(row["output_sqnr_db"]))
    console.print(table)
    console.print(f"average weight bits {report['avg_weight_bits']:.2f}; model {report['model_bytes']:,} bytes "
                  f"(fp32 {report['fp32_bytes']:,}, {report['fp32_bytes'] / report['model_bytes']:.2f}x smaller)")
    if "metric" in metrics:
        key, before, after = metrics["metric"], metrics["before"], metrics["after"]
        console.print(f"test {key}: fp32 {before:.4f}  quantized {after:.4f}  ({after - before:+.4f})")


@user_errors
def quantize(
    src: str = typer.Argument(..., help="A model spec (zoo:cnn, hf:PATH, ...) or a kiln run directory (train, prune, ...)."),
    config: Path = typer.Option(..., "--config", help="Quant config TOML (formats, rules, smoothquant, gptq)."),
    out: Optional[Path] = typer.Option(None, help="Run directory to write (artifact.json, model.safetensors, metrics.json, report.json)."),
    calib_dataset: Optional[str] = typer.Option(None, help="Calibration (and evaluation) dataset; default: the run's or model's."),
    calib_batches: int = typer.Option(16, help="Calibration batches from the training split."),
    batch_size: int = typer.Option(32, help="Calibration batch size."),
    seed: int = typer.Option(0),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Measure fp32 and quantized on the test split."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write metrics and report here."),
) -> None:
    """Quantize a model: wrap the configured modules, calibrate, report SQNR per layer."""
    from kiln.config import read_toml
    from kiln.quant.config import parse_config
    from kiln.quant.run import quantize_run

    validate(positive={"--calib-batches": calib_batches, "--batch-size": batch_size}, new_dirs=[out],
             json_path=json_path)
    check_fits(src, calib_dataset)
    result = quantize_run(src, parse_config(read_toml(config), str(config)), out, calib_dataset, calib_batches,
                          batch_size, seed, evaluate,
                          log=lambda s: err_console.print(f"[dim]{s}[/dim]"))
    print_report(result["report"], result["metrics"])
    if out:
        console.print(f"run: {out}")
    if json_path:
        write_json(json_path, {"metrics": result["metrics"], "report": result["report"]})

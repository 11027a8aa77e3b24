"""`kiln compile SRC`: measure the backends that match eager and keep the fastest."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kiln.cli.common import console, progress, seconds, user_errors, validate, write_json


def print_candidates(report: dict) -> None:
    batch = report["batch"]
    table = Table(title=f"backends for {report['src']} at batch {batch if batch else 'n/a (whole graph)'}, "
                        f"{report['threads']} threads, median of {report['rounds']} interleaved rounds")
    for col in ("backend", "status", "latency", "p90", "samples/s", "vs eager", "rel. error", "roofline", "reason"):
        table.add_column(col, justify="left" if col in ("backend", "status", "reason") else "right")
    eager = next((c["latency_s"] for c in report["candidates"] if c["backend"] == "eager"), None)
    for c in report["candidates"]:
        ok = c["status"] == "ok"
        mark = " *" if c["backend"] == report["chosen"] else ""
        table.add_row(
            c["backend"] + mark, c["status"], seconds(c["latency_s"]) + (" contended" if c.get("contended") else "")
            if ok else "-",
            seconds(c["p90_s"]) if ok else "-", f"{c['throughput']:.1f}" if ok else "-",
            f"{eager / c['latency_s']:.2f}x" if ok and eager else "-",
            "-" if c["error"] is None else f"{c['error']:.1e}",
            f"{c['roofline_fraction']:.0%}" + ("!" if c["roofline_fraction"] > 1 else "") if c.get("roofline_fraction")
            else "-", c["reason"])
    console.print(table)
    if report.get("timing_note"):
        console.print(f"[yellow]timing: {report['timing_note']}[/yellow]")
    for line in report.get("quantized", {}).get("lines", []):
        console.print(line, highlight=False, soft_wrap=True)
    roof = report.get("roofline", {})
    if roof.get("note"):
        console.print(f"[yellow]!: {roof['note']}[/yellow]")
    if roof.get("roofline_s"):
        console.print(f"roofline on {roof['hardware']}: {seconds(roof['roofline_s'])} ({roof['bound']}-bound, "
                      f"{roof['flops'] / 1e9:.3g} GFLOP per call); chosen: {report['chosen']}")


@user_errors
def compile(
    src: str = typer.Argument(..., help="A model spec, a run directory or an artifact directory."),
    backend: str = typer.Option("auto", help="auto, or backends joined by '+', each NAME[:key=value,...]: "
                                             "eager, export, inductor, onnxruntime, openvino, torchao, torch.ao (openvino:int8: NNCF int8)."),
    batch: int = typer.Option(1, min=1, help="Batch size to compile and measure at."),
    precision: str = typer.Option("fp32", help="Lowest precision a candidate may compute in: fp32, bf16, int8."),
    rounds: int = typer.Option(20, min=1, help="Interleaved timing rounds."),
    hardware: str = typer.Option("local", "--hardware", "-H", help="Profile for the roofline bound."),
    out: Optional[Path] = typer.Option(None, help="Directory to write the choice, the report and the deployable file."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the report here."),
) -> None:
    """Build every candidate backend, reject those that leave their tolerance against eager,
    time the rest side by side and keep the fastest."""
    from kiln.cli.analyze import _hardware
    from kiln.compile.run import CompileConfig, compile_run
    from kiln.config import from_dict

    validate(positive={"--batch": batch, "--rounds": rounds}, out_dirs=[out], json_path=json_path)
    # parsed (bad names fail) before a first-run calibration of the hardware profile
    config = from_dict(CompileConfig, {"backend": backend, "batch": batch, "precision": precision, "rounds": rounds},
                       "compile options")
    profile = _hardware(hardware)
    with progress(f"compiling {src}") as update:
        report, _ = compile_run(src, config, out, profile, progress=update)
    print_candidates(report)
    if json_path:
        write_json(json_path, report)
    if out:
        console.print(f"written: {out}")

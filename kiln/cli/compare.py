"""`kiln compare`: every optimisation on every model, on every hardware profile, one report."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kiln.cli.common import console, err_console, progress, user_errors, validate, write_json

DEFAULT_MODELS = "zoo:cnn,zoo:resnet20,zoo:mobilenet_v2,zoo:vit_tiny,zoo:minilm_cls,zoo:gpt,zoo:gcn,zoo:vae,zoo:ddpm,zoo:c3d"


@user_errors
def compare(
    models: str = typer.Option(DEFAULT_MODELS, help="Comma-separated model specs (zoo:NAME, ...)."),
    optimizations: str = typer.Option("int8,fp8,mxfp4,2:4,structured50,lowrank,passes",
                                      help="Comma-separated optimisations."),
    hardware: str = typer.Option("local,a100,h100,rpi4,alveo-u250", help="Comma-separated hardware profiles."),
    out: Path = typer.Option(Path("runs/compare"), help="Directory of the cells, results and report."),
    resume: bool = typer.Option(False, "--resume", help="Go on from the cells OUT already holds."),
    train_steps: Optional[int] = typer.Option(
        None, help="Steps of `kiln train` for each base model (0: the zoo's weights) [default: each model's recipe, "
                   "else 200]."),
    train_lr: Optional[float] = typer.Option(None, help="[default: each model's recipe, else 5e-4]"),
    finetune_steps: Optional[int] = typer.Option(
        None, help="Steps of recovery fine-tuning after pruning/low rank (0: none) [default: recipe, else 50]."),
    finetune_lr: Optional[float] = typer.Option(None, help="[default: each model's recipe, else 1e-4]"),
    batch_size: int = typer.Option(32),
    calib_batches: int = typer.Option(4, help="Calibration batches for quantization."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Measure batch-1 latency on this CPU."),
    backend: str = typer.Option("auto", help="`kiln compile --backend` for the measured latency."),
    rounds: int = typer.Option(5, help="Timing rounds per candidate backend."),
    recipes: bool = typer.Option(True, "--recipes/--no-recipes",
                                 help="Train each zoo model by its recipe (kiln.compare.config.RECIPES) where "
                                      "--train-steps/--train-lr/--finetune-* are not given."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results here (- for stdout)."),
) -> None:
    """Run each optimisation on each model; measure metric, size, FLOPs, latency and rooflines."""
    from kiln.compare import compare_run, parse_config

    validate(out_dirs=[out], json_path=json_path)
    cfg = parse_config(models, optimizations, hardware, train_steps=train_steps, train_lr=train_lr,
                       finetune_steps=finetune_steps, finetune_lr=finetune_lr, batch_size=batch_size,
                       calib_batches=calib_batches, latency=latency, backend=backend, rounds=rounds,
                       recipes=recipes)
    if latency:
        from kiln.compile.run import candidates
        from kiln.compile.backends import Precision

        candidates(backend, Precision.FP32)   # an unknown backend fails before any work
    with progress("compare") as update:
        results = compare_run(cfg, out, resume, log=lambda s: err_console.print(f"[dim]{s}[/dim]"),
                              progress=update)
    for line in results["observations"]:
        console.print(f"- {line}")
    failed = sum(1 for c in results["cells"] if "error" in c)
    added = results["latencies_added"]
    console.print(f"{len(results['cells'])} cells ({results['cells_run']} run now, {results['cells_resumed']} resumed"
                  f"{f', {added} given their latency' if added else ''}{f', {failed} failed' if failed else ''}); "
                  f"report: {out / 'report.html'}")
    if json_path:
        write_json(json_path, results)

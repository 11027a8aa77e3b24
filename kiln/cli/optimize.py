"""`kiln optimize SRC --target HW --max-drop D --out runs/NAME`: one command from a model to a
smaller, faster, verified deployable and its report."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kiln.cli.common import check_fits, console, error_line, progress, user_errors, validate, write_json


@user_errors
def optimize(
    src: str = typer.Argument(..., help="A model spec (zoo:cnn, hf:PATH, ...) or a kiln run directory (a trained model)."),
    target: str = typer.Option("local", "--target", "-t", help="Hardware profile: local (measured) or any "
                                                                "`kiln hardware` profile (roofline cost model)."),
    max_drop: float = typer.Option(..., "--max-drop", help="The largest metric drop allowed (absolute: in the "
                                                           "metric's units, 0.01 = one accuracy point)."),
    drop_type: str = typer.Option("absolute", "--drop-type", help="absolute, or relative (a fraction of the baseline)."),
    objective: str = typer.Option("latency", "--objective", help="latency, size or energy."),
    budget: float = typer.Option(10.0, "--budget", help="Minutes for analysis, sensitivity and search (the "
                                                        "result's compile and LoadGen run after)."),
    batch: int = typer.Option(1, "--batch", help="Batch size the latency is measured and compiled at."),
    seed: int = typer.Option(0, "--seed", help="The sampler's seed."),
    out: Path = typer.Option(..., "--out", help="Run directory (new, or the one to --resume)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (its finished phases and trials are kept)."),
    backend: str = typer.Option("auto", "--backend", help="The final compile's candidates (auto, or NAME+NAME)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the result here."),
) -> None:
    """Analyse, measure per-layer sensitivity, search quantization, sparsity, low rank and the
    backend together within a time budget, and deliver the best model that keeps the metric
    within --max-drop: compiled, run under LoadGen, with a report."""
    from kiln.cli.analyze import _hardware
    from kiln.compile.run import candidates
    from kiln.compile.backends import Precision
    from kiln.optimize.config import OptimizeConfig, parse_drop_type, parse_goal
    from kiln.optimize.run import ConstraintNotMet, Hooks, optimize_run

    validate(positive={"--budget": budget, "--batch": batch}, non_negative={"--max-drop": max_drop},
             out_dirs=[] if resume else [], new_dirs=[] if resume else [out], json_path=json_path)
    cfg = OptimizeConfig(src=src, target=target, max_drop=max_drop, drop_type=parse_drop_type(drop_type),
                         objective=parse_goal(objective), budget_min=budget, batch=batch, seed=seed)
    candidates(backend, Precision.INT8)       # an unknown backend fails before any work
    check_fits(src)
    profile = _hardware(target)               # an unknown target fails here
    with progress(f"optimizing {src}") as update:
        state = {"phase": "starting"}

        def phase(name):
            state["phase"] = name
            update(name)

        hooks = Hooks(log=lambda s: update(f"{state['phase']}: {s}"), phase=phase, final_backend=backend)
        try:
            result = optimize_run(cfg, out, profile, resume=resume, hooks=hooks)
        except ConstraintNotMet as exc:
            error_line(str(exc))     # the report is kept; exit 1: the run worked, the constraint did not
            raise typer.Exit(1) from None
    _print(result, out)
    if json_path:
        write_json(json_path, result)


def _print(result: dict, out: Path) -> None:
    conf, dep = result["confirm"], result["deploy"]
    side = dep.get("side_by_side")
    console.print(f"chosen: trial {result['chosen']['number']} ({result['chosen']['params']['precision']}), "
                  f"backend {dep['chosen_backend']}")
    console.print(f"{conf['metric']}: validation {conf['val']:.4f} (drop {conf['drop_val']:+.4f}), "
                  f"test {conf['test']:.4f} (drop {conf['drop_test']:+.4f})")
    if side:
        console.print(f"latency {side['baseline_ms']:.3f} ms -> {side['result_ms']:.3f} ms ({side['speedup']:.2f}x, "
                      f"side by side{', contended' if side['contended'] else ''})")
    console.print(f"deployable: {out / 'model'} (compiled: {out / 'compiled'})")
    console.print(f"report: {out / 'report.html'}")

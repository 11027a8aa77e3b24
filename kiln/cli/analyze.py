"""`kiln analyze SPEC`: capture a model and report its cost, memory, roofline and measured time."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from kiln.cli.common import console, err_console, progress, seconds, si, user_errors, validate, write_json


def _hardware(name: str):
    from kiln.hardware.profiles import available, load_profile, save_profile

    if name == "local" and "local" not in available():
        from kiln.hardware.calibrate import calibrate

        with progress("no 'local' profile yet: calibrating this machine (once)") as update:
            cal = calibrate("local", budget_s=2.0, progress=update)   # quick; `kiln hardware calibrate` refines it
        if cal.warnings():
            err_console.print(f"[yellow]calibration: busy machine? {'; '.join(cal.warnings())}; re-run "
                              f"`kiln hardware calibrate` when it is quiet[/yellow]")
        save_profile(cal.profile)
    return load_profile(name)


@user_errors
def analyze(
    spec: str = typer.Argument(..., help="zoo:NAME, hf:PATH, hf-config:TYPE[?k=v&...], py:FILE.py:FACTORY, "
                                         "preset:NAME or a run directory (costed as it runs)"),
    hardware: str = typer.Option("local", "--hardware", "-H", help="Profile name or .toml (`kiln hardware`)."),
    input_shape: Optional[List[str]] = typer.Option(None, "--input-shape", help="DIMS or NAME=DIMS, e.g. 4x3x32x32; repeatable."),
    depth: int = typer.Option(2, min=0, help="Module depth of the per-module roll-up."),
    svg: Optional[Path] = typer.Option(None, help="Write the graph drawing (SVG) here."),
    color_by: str = typer.Option("bound", help="SVG colouring: bound or cost."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full analysis as JSON here."),
    measure: bool = typer.Option(True, help="Measure per-op and whole-model time on this CPU (kiln.timing)."),
    top: int = typer.Option(12, min=0, help="How many of the costliest ops to list."),
    meta: Optional[bool] = typer.Option(None, "--meta/--weights", help="Build without weights (meta device) or "
                                        "with them; default: without when a config-built model's weights would not fit."),
    train: bool = typer.Option(False, "--train", help="Analyse a whole training step (forward, loss, backward, optimizer)."),
    optimizer: str = typer.Option("adamw", help="With --train: a torch.optim optimizer (adamw, adam, sgd, ...)."),
    checkpoint_activations: bool = typer.Option(False, "--checkpoint-activations", help="With --train: checkpoint the repeated blocks."),
    mixed_precision: str = typer.Option("fp32", "--mixed-precision", help="With --train: fp32 or bf16 (bf16 weights/grads, fp32 master)."),
) -> None:
    """Shapes, parameters, FLOPs, bytes, memory, roofline and measured per-op time of a model."""
    from kiln.errors import KilnError

    validate(outputs=[svg], json_path=json_path)
    if color_by not in ("bound", "cost"):
        raise KilnError(f"--color-by {color_by!r}: expected bound or cost")
    from kiln.analysis.report import analyze as run_analysis
    from kiln.cli.analyze_source import base_analysis, load_target, print_as_it_runs, source_json
    from kiln.models.inputs import parse_shape

    from kiln.hardware.profiles import available, load_profile

    if train:   # bad step options fail before the model loads
        from kiln.graph.step import Precision, optimizer_class

        optimizer_class(optimizer)
        if mixed_precision not in {p.value for p in Precision}:
            raise KilnError(f"--mixed-precision {mixed_precision!r}: expected {' or '.join(p.value for p in Precision)}")
    for item in input_shape or []:   # malformed shapes fail before the model loads
        parse_shape(item.rpartition("=")[2])
    if hardware != "local" or "local" in available():
        load_profile(hardware)       # so does an unknown profile (a missing 'local' is measured later)
    target = load_target(spec, list(input_shape or []), meta)
    loaded, no_weights = target.loaded, target.no_weights
    hw = _hardware(hardware)
    if train:
        from kiln.cli import analyze_train

        with progress(f"analysing a training step of {spec}"):
            step = analyze_train.run(loaded, hw, optimizer, checkpoint_activations, mixed_precision)
        analyze_train.print_step(loaded.spec, step)
        _write({json_path: ("json", step.to_json())} if json_path else {})
        return
    with progress(f"analysing {spec}") as update:
        result = run_analysis(loaded, hw, measure_time=measure, progress=update, execution=target.execution)
    base = base_analysis(target, list(input_shape or []), hw) if target.base_spec else None
    outputs = {}
    if json_path:
        outputs[json_path] = ("json", result.to_json(depth) | source_json(base))
    if svg:
        from kiln.graph.draw import render_svg

        outputs[svg] = ("svg", render_svg(result.graph, result.rows(), color_by))
    _print(result, depth, top, no_weights)
    if result.runs_as is not None:
        print_as_it_runs(result, base)
    _write(outputs)


def _write(outputs: dict) -> None:
    from kiln.io import atomic_write_text

    for path, (kind, data) in outputs.items():
        if kind == "json":
            write_json(path, data)
        else:
            atomic_write_text(path, data)
        if str(path) != "-":
            console.print(f"wrote {path}")


def _eff(roof: float, measured: float | None) -> str:
    """roofline / measured; above 100% the profile's peaks are below what this run achieved,
    and the mark sends the reader to the note under the table."""
    if not (measured and roof):
        return "-"
    return f"{100 * roof / measured:.0f}%" + ("!" if roof > measured else "")


def _over_peak(rows) -> bool:
    return any(r["measured_s"] and r["roofline_s"] > r["measured_s"] for r in rows)


def _over_peak_note() -> str:
    from kiln.hardware.profiles import ABOVE_PEAK

    return f"[yellow]!: {ABOVE_PEAK}[/yellow]"


def _print(a, depth: int, top: int, no_weights: str = "") -> None:
    hw, m, flops = a.hardware, a.measured, a.flops
    here = hw.measured_here
    console.print(f"[bold]{a.loaded.spec}[/bold]  {a.loaded.description}")
    ins = ", ".join(f"{n.name} {'x'.join(map(str, n.shape))} {n.dtype}" for n in a.graph.nodes if n.kind.value == "input")
    console.print(f"inputs: {ins}")
    s = Table(show_header=False, box=None)
    if no_weights:
        from kiln.cli.analyze_source import weights_line

        s.add_row("weights", weights_line(no_weights))
    for k, v in (
        ("parameters", f"{a.params:,} ({si(a.param_bytes, 'B')})"),
        ("FLOPs / MACs", f"{si(flops, 'FLOP')} / {si(flops // 2, 'MAC')}"),
        ("bytes moved (unfused)", si(a.cost.bytes, "B")),
        ("arithmetic intensity", f"{flops / max(a.cost.bytes, 1):.2f} FLOP/B (ridge {hw.ridge():.1f})"),
        ("peak activation memory", f"{si(a.memory.peak_activation_bytes, 'B')} (at {a.memory.peak_at})"),
        (f"roofline on {hw.name}", f"{seconds(a.roofline.latency_s)}, {a.roofline.bound.value}-bound "
                                   f"(compute-bound ops {seconds(a.roofline.compute_s)}, memory-bound ops {seconds(a.roofline.memory_s)})"),
    ):
        s.add_row(k, v)
    if m:
        from kiln.timing import format_timing

        s.add_row("measured here", f"eager {format_timing(m.eager)}; graph {format_timing(m.graph)} "
                                   f"({m.threads} threads, medians of {m.repeats} interleaved rounds)")
        s.add_row("per-op sum", f"{seconds(m.ops_s)}, {m.ops_share:.0%} of the graph's time (each op timed on its "
                                f"own arguments; {m.contended_ops} of {len(m.per_node_s)} ops contended)")
        if m.note:
            s.add_row("note", m.note)
    if a.cost.branches:     # another input may take the other branch, at another cost
        s.add_row("torch.cond", f"{'; '.join(a.cost.branches)} (FLOPs counted for that branch only)")
    if a.roofline.fallback_dtypes:
        s.add_row("note", f"{hw.name} has no figure for {', '.join(a.roofline.fallback_dtypes)}: costed at its {hw.fallback} peak")
    console.print(s)
    _rollup_table(f"per module (depth {depth})", "module", a.by_module(depth), flops, m, here, with_params=True)
    _rollup_table("per op type", "op", a.by_op(), flops, m, here)
    _top_table(a, top, here)
    if m and here and _over_peak(a.rows()):   # a roll-up above 100% has an op above 100% in it
        console.print(_over_peak_note())


def _rollup_table(title, key, rows, flops, m, here, with_params=False) -> None:
    t = Table(title=title)
    cols = [key, "ops"] + (["params"] if with_params else []) + ["FLOPs", "%", "bytes", "roofline"]
    cols += (["measured", "efficiency"] if m else [])
    for c in cols:
        t.add_column(c, justify="left" if c == key else "right")
    sort_key = "measured_s" if m else "roofline_s"
    for r in sorted(rows, key=lambda r: -r[sort_key])[:25]:
        cells = [r[key], str(r["count"])] + ([si(r["params"])] if with_params else [])
        cells += [si(r["flops"]), f"{100 * r['flops'] / max(flops, 1):.1f}", si(r["bytes"], "B"), seconds(r["roofline_s"])]
        if m:
            cells += [seconds(r["measured_s"]), _eff(r["roofline_s"], r["measured_s"]) if here else "-"]
        t.add_row(*cells)
    console.print(t)


def _top_table(a, top: int, here: bool) -> None:
    if not top:
        return
    m = a.measured
    key = "measured_s" if m else "roofline_s"
    t = Table(title=f"costliest ops (by {'measured' if m else 'roofline'} time)")
    for c in ("node", "op", "module", "shape", "FLOPs", "bytes", "FLOP/B", "bound", "roofline", "measured", "eff."):
        t.add_column(c, justify="right" if c in ("FLOPs", "bytes", "FLOP/B", "roofline", "measured", "eff.") else "left")
    for r in sorted(a.rows(), key=lambda r: -(r[key] or 0))[:top]:
        t.add_row(r["name"], r["op"], r["module"], "x".join(map(str, r["shape"])), si(r["flops"]), si(r["bytes"], "B"),
                  f"{r['intensity']:.1f}", r["bound"], seconds(r["roofline_s"]), seconds(r["measured_s"]),
                  _eff(r["roofline_s"], r["measured_s"]) if here else "-")
    console.print(t)
    if not here and m:
        console.print("[dim]efficiency is shown when the roofline is this machine's (--hardware local)[/dim]")

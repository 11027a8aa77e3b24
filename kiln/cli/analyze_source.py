"""What `kiln analyze` analyses: a model spec (with weights, or without them on the meta
device: kiln.models.meta) or a run directory, costed as it runs (kiln.runs.execution)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from kiln.cli.common import console, progress, seconds, si


@dataclass
class Target:
    loaded: object                 # kiln.models.loaded.LoadedModel
    no_weights: str = ""           # why it was built without weights ("" when it has them)
    execution: object = None       # kiln.analysis.execution.Execution of a run directory
    base_spec: str = ""            # the spec a run directory's model comes from
    transforms: tuple = ()


def load_target(src: str, input_shape: list[str], meta: bool | None) -> Target:
    """A run directory (anything that is a directory), else a model spec."""
    if Path(src).is_dir():
        return _load_run(src, input_shape)
    from kiln.models.inputs import check_runs, with_input_shapes
    from kiln.models.meta import load_for_analysis, with_meta_input_shapes
    from kiln.models.presets import check_preset
    from kiln.models.spec import parse_query

    if src.startswith("preset:"):     # a bad name or field is one line, before any progress line
        name, _, query = src.removeprefix("preset:").partition("?")
        check_preset(name, parse_query(src, query), src)
    with progress(f"loading {src}"):
        loaded, no_weights = load_for_analysis(src, meta)
        if no_weights:
            return Target(with_meta_input_shapes(loaded, input_shape), no_weights)
        loaded = with_input_shapes(loaded, input_shape)
        if not input_shape:
            check_runs(loaded)
    return Target(loaded)


def _load_run(run_dir: str, input_shape: list[str]) -> Target:
    import dataclasses

    from kiln.models.inputs import with_input_shapes
    from kiln.runs.artifact import load_source
    from kiln.runs.execution import as_it_runs

    with progress(f"loading {run_dir}"):
        source = load_source(run_dir)
        model, execution = as_it_runs(source.model, source.transforms)
        loaded = dataclasses.replace(source.loaded, spec=run_dir, model=model.eval(),
                                     description=f"{source.spec} after {', '.join(t.kind for t in source.transforms)}")
        loaded = with_input_shapes(loaded, input_shape)
    return Target(loaded, "", execution, source.spec, tuple(source.transforms))


def weights_line(no_weights: str) -> str:
    return (f"none materialised (meta device: {no_weights}); every figure below comes from shapes and "
            f"dtypes, as it would with weights; nothing measured")


def base_analysis(target: Target, input_shape: list[str], hw):
    """The analysis of a run directory's source spec, the 'before' of its compression."""
    from kiln.analysis.report import analyze
    from kiln.models.inputs import with_input_shapes
    from kiln.models.spec import load

    with progress(f"analysing the source {target.base_spec}"):
        return analyze(with_input_shapes(load(target.base_spec), input_shape), hw, measure_time=False)


def source_json(base) -> dict:
    """The run directory's source spec, for the JSON beside `as_it_runs`."""
    if base is None:
        return {}
    return {"source": {"spec": base.loaded.spec, "flops": base.flops, "bytes": base.cost.bytes,
                       "param_bytes": base.param_bytes, "roofline_s": base.roofline.latency_s}}


def print_as_it_runs(a, base) -> None:
    """Source spec, the artifact with dense float kernels, and the artifact as it runs."""
    r, hw = a.runs_as, a.hardware
    t = Table(title=f"as it runs on {hw.name}: {a.loaded.spec}")
    for c in ("", f"source {base.loaded.spec}" if base else "source", "dense float kernels", "as it runs"):
        t.add_column(c, justify="left" if not c else "right")
    rows = [("FLOPs", si(base.flops) if base else "-", si(a.flops), si(r.flops)),
            ("weights", si(base.param_bytes, "B") if base else "-", si(a.param_bytes, "B"), si(r.weight_bytes, "B")),
            ("bytes moved", si(base.cost.bytes, "B") if base else "-", si(a.cost.bytes, "B"), si(r.bytes, "B")),
            ("roofline", seconds(base.roofline.latency_s) if base else "-", seconds(a.roofline.latency_s),
             f"{seconds(r.roofline.latency_s)} ({r.roofline.bound.value}-bound)")]
    for row in rows:
        t.add_row(*row)
    console.print(t)
    keys = ", ".join(f"{k} x{n}" for k, n in sorted(r.keys.items()))
    console.print(f"ops with FLOPs run at: {keys}; {r.quantized_modules} quantized and {r.sparse_modules} sparse modules")
    for note in r.notes:
        console.print(f"[dim]{note}[/dim]")

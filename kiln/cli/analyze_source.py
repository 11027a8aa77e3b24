"""What `kiln analyze` analyses: a model spec (with weights, or without them on the meta
device: kiln.models.meta) or a run directory, costed as it runs (kiln.runs.execution)."""
from __future__ import annotations

from kiln.cli.common import progress


def load_model(spec: str, input_shape: list[str], meta: bool | None):
    """(the model with its inputs, why it has no weights: "" when it has them)."""
    from kiln.models.inputs import check_runs, with_input_shapes
    from kiln.models.meta import load_for_analysis, with_meta_input_shapes

    with progress(f"loading {spec}"):
        loaded, no_weights = load_for_analysis(spec, meta)
        if no_weights:
            return with_meta_input_shapes(loaded, input_shape), no_weights
        loaded = with_input_shapes(loaded, input_shape)
        if not input_shape:
            check_runs(loaded)
    return loaded, ""


def weights_line(no_weights: str) -> str:
    return (f"none materialised (meta device: {no_weights}); every figure below comes from shapes and "
            f"dtypes, as it would with weights; nothing measured")

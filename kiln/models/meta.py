"""Models without weights: built on PyTorch's meta device, where tensors have shapes and
dtypes but no storage, so a 70B model's graph, FLOPs, bytes, memory and roofline can be had
on a laptop. Every figure kiln's analysis gives depends on shapes and dtypes only (the cost,
memory and roofline passes read `meta["val"]` of the exported graph), so they are the figures
of the model with weights; only what needs values (measured time, accuracy, data-dependent
branches) is out of reach.

`kiln analyze` chooses this by itself for specs built from a config (`hf-config:`, `preset:`)
whose weights would not fit in this machine's memory, or when asked (`--meta`).
"""
from __future__ import annotations

import torch

from kiln.errors import KilnError, first_line
from kiln.models.inputs import replace_inputs, requested_shapes
from kiln.models.loaded import LoadedModel, available_bytes, is_meta, weight_bytes
from kiln.models.spec import load

# Specs built from a config: building them on the meta device costs seconds, whatever their size.
FROM_CONFIG = ("hf-config:", "preset:")


def load_meta(spec: str) -> LoadedModel:
    """`spec` built with every parameter, buffer and example input on the meta device."""
    try:
        with torch.device("meta"):
            loaded = load(spec)
    except KilnError:
        raise
    except Exception as exc:   # a loader that needs real values (reads or checks weights)
        raise KilnError(f"cannot build {spec} without weights (meta device): {type(exc).__name__}: "
                        f"{first_line(exc)}") from None
    tensors = [*loaded.example_inputs, *loaded.example_kwargs.values()]
    if not is_meta(loaded.model) and not any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
        raise KilnError(f"cannot build {spec} without weights: its loader placed them on a real device")
    return loaded


def too_big(model: torch.nn.Module, headroom: float = 2.0) -> str:
    """Why the model's weights would not fit in memory ("" when they would): `headroom` times
    the weights, for the activations and the copies building and capture make."""
    need, have = weight_bytes(model), available_bytes()
    if headroom * need <= have:
        return ""
    return f"its weights need {need / 1e9:.1f} GB and this machine has {have / 1e9:.1f} GB available"


def load_for_analysis(spec: str, meta: bool | None = None) -> tuple[LoadedModel, str]:
    """(the model, why it has no weights: "" when it has them). meta=None decides: specs built
    from a config are built on the meta device first and kept there when too big."""
    if meta:
        return load_meta(spec), "asked for (--meta)"
    if meta is None and spec.startswith(FROM_CONFIG):
        loaded = load_meta(spec)
        reason = too_big(loaded.model)
        if reason:
            return loaded, reason
    return load(spec), ""


def with_meta_input_shapes(loaded: LoadedModel, overrides: list[str]) -> LoadedModel:
    """`--input-shape` on a model without weights: meta inputs of the requested shapes, the
    dtypes kept (nothing can run to check them: capture does)."""
    if not overrides:
        return loaded
    wanted = requested_shapes(loaded, overrides)
    tensors = {f"input{i}": x for i, x in enumerate(loaded.example_inputs)} | dict(loaded.example_kwargs)
    return replace_inputs(loaded, {k: torch.empty(wanted[k], dtype=x.dtype, device="meta")
                                   for k, x in tensors.items() if k in wanted})

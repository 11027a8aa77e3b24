"""Input-shape overrides (`--input-shape`) and the check that the model accepts its inputs.

Syntax: `DIMS` for the first input, or `NAME=DIMS` (NAME a keyword input such as input_ids,
or input0, input1, ... for positional ones); DIMS like 4x3x64x64. Inputs that had the same
shape as an overridden one follow it (so one `--input-shape 4x256` resizes input_ids,
attention_mask and token_type_ids together).
"""
from __future__ import annotations

import dataclasses
import re

import torch

from kiln.errors import KilnError, first_line
from kiln.models.loaded import LoadedModel

_DIMS = re.compile(r"^\d+(x\d+)*$")


def parse_shape(text: str) -> tuple[int, ...]:
    if not _DIMS.match(text) or any(int(d) == 0 for d in text.split("x")):
        raise KilnError(f"bad input shape {text!r}: expected positive sizes joined by x, e.g. 1x3x32x32")
    return tuple(int(d) for d in text.split("x"))


def _like(example: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A new tensor of `shape` with the example's dtype and value range."""
    if example.is_floating_point():
        return torch.randn(shape, generator=gen, dtype=example.dtype)
    lo, hi = int(example.min()), int(example.max())
    if lo == hi:
        return torch.full(shape, lo, dtype=example.dtype)
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=example.dtype)


def requested_shapes(loaded: LoadedModel, overrides: list[str]) -> dict[str, tuple[int, ...]]:
    """Input name -> the shape asked for, inputs that shared an overridden input's shape included."""
    tensors = _inputs(loaded)
    names = list(tensors)
    wanted: dict[str, tuple[int, ...]] = {}
    for item in overrides:
        name, sep, dims = item.rpartition("=")
        name = name if sep else (names[0] if names else "")
        if name not in tensors or not isinstance(tensors[name], torch.Tensor):
            raise KilnError(f"--input-shape {item}: no tensor input {name!r}; inputs: {', '.join(names) or 'none'}")
        wanted[name] = parse_shape(dims)
    for name, shape in list(wanted.items()):
        old = tuple(tensors[name].shape)
        for other, x in tensors.items():
            if other not in wanted and isinstance(x, torch.Tensor) and tuple(x.shape) == old:
                wanted[other] = shape
    return wanted


def _inputs(loaded: LoadedModel) -> dict:
    return {f"input{i}": x for i, x in enumerate(loaded.example_inputs)} | dict(loaded.example_kwargs)


def replace_inputs(loaded: LoadedModel, new: dict) -> LoadedModel:
    """A copy of `loaded` with the inputs named in `new` replaced."""
    tensors = _inputs(loaded) | new
    args = tuple(tensors[f"input{i}"] for i in range(len(loaded.example_inputs)))
    kwargs = {k: tensors[k] for k in loaded.example_kwargs}
    return dataclasses.replace(loaded, example_inputs=args, example_kwargs=kwargs)


def with_input_shapes(loaded: LoadedModel, overrides: list[str]) -> LoadedModel:
    """A copy of `loaded` whose example inputs have the requested shapes (and are checked)."""
    if not overrides:
        return loaded
    wanted = requested_shapes(loaded, overrides)
    gen = torch.Generator().manual_seed(0)
    tensors = _inputs(loaded)
    result = replace_inputs(loaded, {k: _like(x, wanted[k], gen) for k, x in tensors.items() if k in wanted})
    check_runs(result, " with input shape " + " ".join(overrides))
    return result


def check_runs(loaded: LoadedModel, context: str = "") -> None:
    """Run the model once; a failure is the user's input problem, reported in one line."""
    try:
        loaded.run()
    except Exception as exc:
        shapes = ", ".join(f"{n}={'x'.join(map(str, t.shape))}" for n, t in _tensors(loaded))
        raise KilnError(f"{loaded.spec} rejected its inputs{context} ({shapes}): "
                        f"{type(exc).__name__}: {first_line(exc)}") from None


def _tensors(loaded: LoadedModel):
    for i, x in enumerate(loaded.example_inputs):
        if isinstance(x, torch.Tensor):
            yield f"input{i}", x
    for k, x in loaded.example_kwargs.items():
        if isinstance(x, torch.Tensor):
            yield k, x

"""py:FILE.py:FACTORY: a user's own module from a factory function in a Python file.

The factory takes no arguments and returns one of: an nn.Module with an `example_inputs`
attribute, (module, example_inputs), (module, example_inputs, example_kwargs), or a
LoadedModel.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from kiln.errors import KilnError, first_line
from kiln.models.loaded import LoadedModel

SHAPES = "return a module with .example_inputs, (module, inputs), (module, inputs, kwargs) or a LoadedModel"


def load_factory(rest: str, spec: str) -> LoadedModel:
    file, sep, factory = rest.rpartition(":")
    if not sep or not file.endswith(".py") or not factory:
        raise KilnError(f"bad spec {spec!r}: expected py:FILE.py:FACTORY")
    path = Path(file)
    if not path.is_file():
        raise KilnError(f"{spec}: file {file} does not exist")
    module = _import(path, spec)
    fn = getattr(module, factory, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise KilnError(f"{spec}: no factory {factory!r} in {file}; callables there: {', '.join(names) or 'none'}")
    try:
        result = fn()
    except Exception as exc:
        raise KilnError(f"{spec}: factory {factory} raised {type(exc).__name__}: {first_line(exc)}") from None
    return _as_loaded(result, spec)


def _import(path: Path, spec: str):
    name = f"kiln_user_{path.stem}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise KilnError(f"{spec}: importing {path} raised {type(exc).__name__}: {first_line(exc)}") from None
    return module


def _as_loaded(result, spec: str) -> LoadedModel:
    if isinstance(result, LoadedModel):
        result.spec = spec
        return result
    kwargs: dict = {}
    if isinstance(result, torch.nn.Module):
        model, inputs = result, getattr(result, "example_inputs", None)
        if inputs is None:
            raise KilnError(f"{spec}: the factory's module has no example_inputs; {SHAPES}")
    elif isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[0], torch.nn.Module):
        model, inputs = result[0], result[1]
        kwargs = result[2] if len(result) == 3 else {}
    else:
        raise KilnError(f"{spec}: the factory returned {type(result).__name__}; {SHAPES}")
    try:
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        kwargs = dict(kwargs)
    except (TypeError, ValueError):
        raise KilnError(f"{spec}: the factory's inputs are not a tensor, a tuple of them, or a dict; {SHAPES}") from None
    return LoadedModel(spec, model.eval(), inputs, kwargs, description=f"user model {type(model).__name__}")

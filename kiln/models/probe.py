"""What named submodules receive and return during one call of a model, through forward hooks."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def record(model: nn.Module, fqns: list[str], run: Callable[[nn.Module], object], *,
           outputs: bool = False) -> dict[str, tuple | torch.Tensor]:
    """Each named module's positional inputs (a tuple, the first call's) or, with `outputs`, its
    output (the first element of a tuple output, the last call's), detached, from `run(model)`
    under no_grad."""
    seen: dict[str, tuple | torch.Tensor] = {}

    def on_input(fqn):
        return lambda m, args: seen.setdefault(fqn, tuple(a.detach() for a in args))

    def on_output(fqn):
        def hook(m, args, y):
            seen[fqn] = (y[0] if isinstance(y, tuple) else y).detach()
        return hook

    handles = [model.get_submodule(f).register_forward_hook(on_output(f)) if outputs
               else model.get_submodule(f).register_forward_pre_hook(on_input(f)) for f in fqns]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return seen

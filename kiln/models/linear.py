"""Which modules are Linear layers: torch's nn.Linear, and other libraries' layers that are one
in all but their class (a weight (out, in), an optional bias (out), forward F.linear(x, weight,
bias)), such as PyTorch Geometric's `Linear` inside every GCNConv.

kiln's module-level transforms (quantize, prune, low rank) select, wrap and reshape nn.Linear;
each turns the look-alikes into the nn.Linear they are (`as_torch_linears`) before it selects
modules and before its restore rebuilds them, so one rule serves every capability and every
reload. The swap keeps the very Parameters under the same names, so a checkpoint of one loads
into the other. It matters beyond the type test: PyG's Linear overrides `_save_to_state_dict`
to write `weight` itself, so a pruning mask's parametrization on it would save the masked
weight under a name its own restore does not expect.
"""
from __future__ import annotations

import torch
from torch import nn

# (module, class) of layers known to compute F.linear(x, self.weight, self.bias) and nothing
# else, matched by name so that recognising one imports no optional package
LOOK_ALIKES = frozenset({("torch_geometric.nn.dense.linear", "Linear")})


def is_look_alike(module: nn.Module) -> bool:
    """A foreign Linear, materialised (PyG's lazy `Linear(-1, n)` has no shape yet)."""
    cls = type(module)
    return (cls.__module__, cls.__qualname__) in LOOK_ALIKES \
        and not isinstance(module.weight, nn.parameter.UninitializedParameter)


def as_torch_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear holding `module`'s own weight and bias Parameters (not copies)."""
    out_f, in_f = module.weight.shape
    with torch.device("meta"):   # no storage: the module's own Parameters replace these at once
        linear = nn.Linear(in_f, out_f, bias=module.bias is not None, dtype=module.weight.dtype)
    linear.weight = module.weight
    linear.bias = module.bias
    return linear.train(module.training)


def as_torch_linears(model: nn.Module) -> list[str]:
    """Replace, in place, every look-alike submodule of `model` by `as_torch_linear` of it (the
    state dict's names and tensors unchanged); returns their FQNs. Idempotent."""
    swapped = [fqn for fqn, m in model.named_modules() if fqn and is_look_alike(m)]
    for fqn in swapped:
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent), child, as_torch_linear(model.get_submodule(fqn)))
    return swapped

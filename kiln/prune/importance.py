"""Channel importance for structured pruning: one call `group -> scores` (one score per unit).

A criterion scores the rows of one parameter slot (a unit of channels per row); the group's
score averages its parameters' scores, each first divided by its own mean so that a 3x3 conv
and the batch norm after it weigh the same. Buffers (running statistics) never vote.

- l1, l2: the norm of the weights a unit owns (Li et al. 2017, "Pruning Filters for Efficient ConvNets").
- taylor: |w * dL/dw| summed over the unit, the first-order estimate of the loss change when
  the unit is removed (Molchanov et al. 2019), from gradients summed over a few batches.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.prune.deps import Group
from kiln.registry import Registry

# rows: (units, everything else a unit owns); grads likewise, or None
RowScore = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
IMPORTANCE: Registry[RowScore] = Registry("structured importance")
NEEDS_GRADIENTS = ("taylor",)


@IMPORTANCE.register("l1")
def _l1(rows: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
    return rows.abs().sum(1)


@IMPORTANCE.register("l2")
def _l2(rows: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
    return rows.pow(2).sum(1).sqrt()


@IMPORTANCE.register("taylor")
def _taylor(rows: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
    return (rows * grads).abs().sum(1)


def _rows(group: Group, slot, tensor: torch.Tensor) -> torch.Tensor:
    units = torch.arange(group.units)
    idx = group.positions(slot, units)
    return tensor.detach().float().movedim(slot.dim, 0)[idx].reshape(group.units, -1)


def group_scores(group: Group, criterion: str, params: dict[str, torch.Tensor],
                 grads: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One score per unit of `group`: the mean over its parameter slots of mean-normalised scores."""
    fn = IMPORTANCE.get(criterion)
    if criterion in NEEDS_GRADIENTS and grads is None:
        raise KilnError(f"{criterion} importance needs batches of (x, y) to take gradients on")
    total, count = torch.zeros(group.units), 0
    for slot in group.slots:
        if slot.param not in params:
            continue   # a buffer
        g = grads.get(slot.param) if grads is not None else None
        if criterion in NEEDS_GRADIENTS and g is None:
            continue   # a parameter the loss does not reach
        s = fn(_rows(group, slot, params[slot.param]), None if g is None else _rows(group, slot, g))
        total += s / s.mean().clamp_min(1e-12)
        count += 1
    return total / max(count, 1)


def gradients(model: nn.Module, batches: list, loss: Callable) -> dict[str, torch.Tensor]:
    """Sum over `batches` of dL/dp for every parameter (eval mode: no dropout noise); weights unchanged."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        loss(model, x, y).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return grads


def default_loss(model: nn.Module, x, y) -> torch.Tensor:
    """The model's own `.loss(x, y)` if it has one, else cross-entropy of its logits."""
    if hasattr(model, "loss"):
        return model.loss(x, y)
    out = model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, (tuple, list)) else model(x)
    return nn.functional.cross_entropy(out, y)

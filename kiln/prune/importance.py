"""Channel importance for structured pruning: one call `group -> scores` (one score per unit).

The element scores of kiln.prune.criteria (the same criteria unstructured and N:M pruning use)
are reduced over the elements each unit owns (`Reduction`: sum or L2 norm): magnitude with sum
is the L1 norm of a filter, snip with sum the first-order Taylor importance. Buffers (running
statistics) never vote.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.prune.criteria import CRITERIA, Reduction, ScoreContext
from kiln.prune.deps import Group


def _rows(group: Group, slot, tensor: torch.Tensor) -> torch.Tensor:
    units = torch.arange(group.units)
    idx = group.positions(slot, units)
    return tensor.detach().float().movedim(slot.dim, 0)[idx].reshape(group.units, -1)


def group_scores(group: Group, criterion: str, params: dict[str, torch.Tensor], ctx: ScoreContext | None = None,
                 reduction: Reduction = Reduction.SUM) -> torch.Tensor:
    """One score per unit of `group`: the mean over its parameter slots of the unit's element
    scores (kiln.prune.criteria, keyed by parameter name) reduced, each slot first divided by its
    own mean so that a 3x3 conv and the batch norm after it weigh the same."""
    crit = CRITERIA.get(criterion)
    ctx = ctx or ScoreContext()
    if crit.needs_gradients and not ctx.grads:
        raise KilnError(f"criterion {criterion} needs batches of (x, y) to take gradients on")
    total, count = torch.zeros(group.units), 0
    for slot in group.slots:
        if slot.param not in params:
            continue   # a buffer
        if crit.needs_gradients and slot.param not in ctx.grads:
            continue   # a parameter the loss does not reach
        elements = crit(params[slot.param].detach().float(), slot.param, ctx).float()
        s = Reduction(reduction)(_rows(group, slot, elements))
        total += s / s.abs().mean().clamp_min(1e-12)
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

"""N:M semi-structured sparsity: in every group of M consecutive weights along the input
dimension, only N survive (2:4 is what NVIDIA Ampere's sparse tensor cores run: Mishra et al.
2021, "Accelerating Sparse Deep Neural Networks").

A Linear weight (out, in) is grouped along `in`; a Conv weight (out, in, *kernel) along `in` at
each output channel and kernel position. The masks are the same parametrizations as
unstructured pruning, so they survive fine-tuning and reload. A module whose input dimension
is not a multiple of M cannot be grouped: named explicitly it is an error; found by default it
is skipped, and the report says so.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.models.linear import as_torch_linears
from kiln.prune.criteria import ScoreContext
from kiln.prune.unstructured import (PruneResult, default_targets, check_target, restore_masks, scores,
                                     set_mask, sparse_execution, sparsity_report)
from kiln.runs.transforms import register_transform

KIND = "prune-nm"


def check_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or m < 1 or not 0 < n < m:
        raise KilnError(f"N:M sparsity {n}:{m} needs 0 < N < M (N weights kept in each group of M)")


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly n survivors, the highest scores, in each group of m along dim 1."""
    moved = score.movedim(1, -1)
    groups = moved.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    # stable descending order: among equal scores the earlier weight survives
    top = torch.argsort(-groups, dim=1, stable=True)[:, :n]
    keep.scatter_(1, top, True)
    return keep.reshape(moved.shape).movedim(-1, 1)


def groupable(module: nn.Module, m: int) -> str:
    """Why the module cannot be split into N:M groups ("" when it can)."""
    w = module.weight
    if w.dim() < 2:
        return "weight has no input dimension"
    if w.shape[1] % m:
        return f"input dimension {w.shape[1]} is not a multiple of M={m}"
    return ""


def prune_nm(model: nn.Module, n: int = 2, m: int = 4, criterion: str = "magnitude", *,
             targets: Iterable[str] | None = None, ctx: ScoreContext | None = None) -> PruneResult:
    """Mask every target (default: each Linear/Conv) to N:M along its input dimension."""
    check_nm(n, m)
    as_torch_linears(model)   # a mask on PyG's Linear would save under names its restore lacks
    explicit = targets is not None
    chosen, skipped = [], []
    for fqn in (list(targets) if explicit else default_targets(model)):
        reason = groupable(check_target(model, fqn), m)
        if reason and explicit:
            raise KilnError(f"module {fqn!r}: cannot prune {n}:{m}: {reason}")
        (skipped.append({"module": fqn, "reason": reason}) if reason else chosen.append(fqn))
    for fqn, s in scores(model, chosen, criterion, ctx or ScoreContext()).items():
        set_mask(model.get_submodule(fqn), nm_mask(s, n, m))
    record = {"kind": KIND, "n": n, "m": m, "criterion": criterion, "masks": sorted(chosen), "skipped": skipped}
    return PruneResult(model, record, sparsity_report(model, sorted(chosen)))


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of m along the input dimension has at most n non-zeros."""
    groups = (weight.movedim(1, -1).reshape(-1, m) != 0).sum(1)
    return bool((groups <= n).all())


def _execution(model: nn.Module, record: dict):
    n, m = int(record.get("n", 2)), int(record.get("m", 4))
    # each kept value carries its position in the group: log2(M) bits (NVIDIA's 2:4 metadata: 2 bits)
    index_bits = (n / m) * max(1, math.ceil(math.log2(m)))
    return sparse_execution(model, record.get("masks", []), f"{n}:{m}", index_bits, density=n / m)


@register_transform(KIND, execution=_execution)
def _restore(model: nn.Module, record: dict) -> nn.Module:
    if not record.get("permanent"):
        restore_masks(model, record.get("masks", []))
    return model

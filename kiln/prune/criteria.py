"""Pruning criteria: one registry of per-element scores that every pruning method reduces.

A criterion scores each weight. Unstructured pruning drops the lowest scores (per layer or
over every target), N:M the lowest in each group of M, and structured pruning reduces the
scores a unit owns (a channel, a head, a neuron) to one number with a `Reduction`:
  magnitude  |w|; summed over a unit it is the L1 norm of a filter, with `l2` its L2 norm
             (Li et al. 2017, "Pruning Filters for Efficient ConvNets")
  random     uniform noise from a seeded generator (the course's baseline)
  snip       |w * dL/dw| over a few batches (Lee et al. 2019, "SNIP"); summed over a unit it is
             the first-order Taylor estimate of removing it (Molchanov et al. 2019)
  movement   -w * dL/dw accumulated over fine-tuning steps (Sanh et al. 2020, "Movement Pruning")
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import torch

from kiln.errors import KilnError
from kiln.registry import Registry


@dataclass
class ScoreContext:
    """What a criterion may need besides the weight: gradients over batches, movement sums, a seed.
    Keys are the names the caller scores by (module FQNs, or parameter names for structured pruning)."""
    grads: dict[str, torch.Tensor] = field(default_factory=dict)      # key -> sum of dL/dw
    movement: dict[str, torch.Tensor] = field(default_factory=dict)   # key -> sum of -w * dL/dw
    seed: int = 0

    def generator(self, key: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + sum(map(ord, key)))


@dataclass(frozen=True)
class Criterion:
    score: Callable[[torch.Tensor, str, ScoreContext], torch.Tensor]   # (weight, key, ctx) -> same shape
    needs_gradients: bool = False

    def __call__(self, weight: torch.Tensor, key: str, ctx: ScoreContext) -> torch.Tensor:
        return self.score(weight, key, ctx)


CRITERIA: Registry[Criterion] = Registry("pruning criterion")


def _grad(ctx: ScoreContext, key: str, name: str) -> torch.Tensor:
    if key not in ctx.grads:
        raise KilnError(f"{key!r}: criterion {name} needs gradients from data batches, and none were given")
    return ctx.grads[key]


def _movement(w: torch.Tensor, key: str, ctx: ScoreContext) -> torch.Tensor:
    if key in ctx.movement:
        return ctx.movement[key]
    return -(w * _grad(ctx, key, "movement"))   # one step's worth of movement


CRITERIA.register("magnitude")(Criterion(lambda w, key, ctx: w.abs()))
CRITERIA.register("random")(Criterion(lambda w, key, ctx: torch.rand(w.shape, generator=ctx.generator(key))))
CRITERIA.register("snip")(Criterion(lambda w, key, ctx: (w * _grad(ctx, key, "snip")).abs(), needs_gradients=True))
CRITERIA.register("movement")(Criterion(_movement, needs_gradients=True))


def needs_gradients(criterion: str) -> bool:
    return CRITERIA.get(criterion).needs_gradients


class Reduction(str, enum.Enum):
    """How structured pruning turns the element scores a unit owns into the unit's score."""
    SUM = "sum"   # magnitude: the L1 norm; snip: first-order Taylor
    L2 = "l2"     # the square root of the sum of squares

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: (units, elements each unit owns) -> one score per unit."""
        return rows.sum(1) if self is Reduction.SUM else rows.pow(2).sum(1).sqrt()

"""Pruning schedules that run inside the trainer (as step hooks) or around it.

- one-shot: prune once, then fine-tune with the masks fixed.
- AGP (Zhu and Gupta 2017, "To prune, or not to prune"): sparsity grows as
  s_t = s_f + (s_i - s_f) * (1 - t / n)^3 over the first n steps of fine-tuning, the masks
  recomputed every few steps, so the network adapts while weights go.
- movement: the AGP schedule with scores -w * dL/dw summed over the steps seen so far
  (Sanh, Wolf and Rush 2020).
- lottery-ticket rewinding (Frankle and Carbin 2019; Frankle et al. 2020 for rewinding to an
  early or pretrained point): prune a little, reset the survivors to the rewind weights, retrain;
  repeat, each round reaching 1 - (1 - s)^(r / R) of the final sparsity s.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kiln.prune.criteria import ScoreContext
from kiln.prune.unstructured import mask_of, prune_unstructured, raw_weight


def agp_ratio(step: int, steps: int, initial: float, final: float) -> float:
    """Sparsity at `step` of an AGP ramp of `steps` steps (final from then on)."""
    if steps <= 0 or step >= steps:
        return final
    return final + (initial - final) * (1 - step / steps) ** 3


def lottery_ratio(round_: int, rounds: int, final: float) -> float:
    """Sparsity after round r of R: each round prunes the same fraction of what is left."""
    return 1 - (1 - final) ** (round_ / rounds)


@dataclass
class AGP:
    """Trainer hook: recompute the masks every `every` steps along the cubic ramp, which ends
    at `end` (a fraction of the run's steps); with criterion "movement", also accumulate
    -w * dL/dw every step."""
    targets: list[str]
    final: float
    criterion: str = "magnitude"
    scope: str = "global"
    initial: float = 0.0
    end: float = 0.75
    every: int = 10
    overrides: dict[str, float] = field(default_factory=dict)
    ctx: ScoreContext = field(default_factory=ScoreContext)
    history: list[tuple[int, float]] = field(default_factory=list)

    def __call__(self, model: nn.Module, step: int, total: int) -> None:
        if self.criterion == "movement":
            self._accumulate(model)
        steps = max(1, int(self.end * total))
        if step > steps or (step % self.every and step != steps):
            return
        ratio = agp_ratio(step, steps, self.initial, self.final)
        scale = ratio / self.final if self.final else 0.0
        prune_unstructured(model, ratio, self.criterion, self.scope, targets=self.targets,
                           overrides={k: v * scale for k, v in self.overrides.items()}, ctx=self.ctx)
        self.history.append((step, ratio))

    def _accumulate(self, model: nn.Module) -> None:
        for fqn in [*self.targets, *self.overrides]:
            w = raw_weight(model.get_submodule(fqn))
            if w.grad is None:
                continue
            move = -(w.detach() * w.grad.detach())
            self.ctx.movement[fqn] = self.ctx.movement.get(fqn, torch.zeros_like(move)) + move


@torch.no_grad()
def rewind(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Reset every parameter and buffer to `snapshot` (plain state-dict names); masks stay, so
    pruned weights stay zero and the survivors restart from the rewind point."""
    for name, value in snapshot.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr == "weight" and mask_of(module) is not None:
            raw_weight(module).copy_(value)
        else:
            getattr(module, attr).copy_(value)

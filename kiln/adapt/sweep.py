"""What an exit threshold buys: per sample the exit it takes, the accuracy, and the average
FLOPs per sample, counted exactly from the cumulative FLOPs of each exit.

A sample that leaves at exit k has run the backbone up to block k and heads 0..k (each head
before it was evaluated and did not pass); one that reaches the end has run the whole
backbone and every head. The backbone's cumulative FLOPs come from kiln's captured graph
(node costs in execution order, attributed to blocks by module FQN).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from kiln.adapt.early_exit import Criterion, EarlyExit, block_output
from kiln.analysis.cost import AnnotateCost
from kiln.graph.capture import capture
from kiln.graph.passes import PassManager
from kiln.models.loaded import LoadedModel


@dataclass(frozen=True)
class ExitFlops:
    backbone: int               # the backbone alone, whole: the dense baseline
    to_block: tuple[int, ...]   # backbone FLOPs up to and including each exit block
    heads: tuple[int, ...]      # each head's FLOPs

    @property
    def per_exit(self) -> tuple[int, ...]:
        """What a sample costs that leaves at exit k (the last entry: the final output)."""
        out, heads = [], 0
        for k, block in enumerate(self.to_block):
            heads += self.heads[k]
            out.append(block + heads)
        return (*out, self.backbone + sum(self.heads))


def exit_flops(model: EarlyExit, args: tuple, kwargs: dict) -> ExitFlops:
    """Cumulative FLOPs to each exit for one call on (args, kwargs) (batch 1: per sample)."""

    graph = capture(LoadedModel("early-exit backbone", model.backbone, tuple(args), dict(kwargs)))
    PassManager([AnnotateCost()]).run(graph)
    running, last = 0, {f: 0 for f in model.exits}
    for node in graph.ops:
        running += node.cost.flops
        for f in model.exits:
            if node.module == f or node.module.startswith(f + "."):
                last[f] = running
    return ExitFlops(running, tuple(last[f] for f in model.exits), tuple(_head_flops(model, args, kwargs)))


def _head_flops(model: EarlyExit, args: tuple, kwargs: dict) -> list[int]:
    inputs: dict[int, torch.Tensor] = {}
    handles = [model.backbone.get_submodule(f).register_forward_hook(
        lambda _m, _a, out, k=k: inputs.update({k: block_output(out).detach()})) for k, f in enumerate(model.exits)]
    try:
        with torch.no_grad():
            model.backbone(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    flops = []
    for k, head in enumerate(model.heads):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            head(inputs[k], kwargs.get("attention_mask"))
        flops.append(counter.get_total_flops())
    return flops


@dataclass(frozen=True)
class Point:
    threshold: float
    accuracy: float
    avg_flops: float
    exit_fractions: tuple[float, ...]   # share of samples leaving at each exit (the last: final)
    agreement: float = 1.0              # share of samples predicted as the final exit predicts them


def exits_taken(scores: torch.Tensor, criterion: Criterion, threshold: float) -> torch.Tensor:
    """scores (N, heads) -> per sample the first head that passes, or `heads` (the final output)."""
    n, heads = scores.shape
    passing = criterion.passes(scores, threshold)
    first = torch.where(passing.any(1), passing.float().argmax(1), torch.full((n,), heads))
    return first


def point(logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, criterion: Criterion,
          threshold: float, per_exit: tuple[int, ...]) -> Point:
    """logits (exits + 1, N, classes), labels (N,), scores (N, exits) -> one point of the curve."""
    taken = exits_taken(scores, criterion, threshold)
    all_preds = logits.argmax(-1)
    preds = all_preds.gather(0, taken[None]).squeeze(0)
    cost = torch.tensor(per_exit, dtype=torch.float64)[taken]
    counts = torch.bincount(taken, minlength=logits.shape[0]).double() / len(taken)
    return Point(float(threshold), float((preds == labels).double().mean()), float(cost.mean()),
                 tuple(float(c) for c in counts), float((preds == all_preds[-1]).double().mean()))


def thresholds(scores: torch.Tensor, criterion: Criterion, n: int) -> list[float]:
    """`n` thresholds spread over the observed scores (quantiles), from exiting nearly never to
    nearly always, plus one no sample can pass."""
    qs = torch.quantile(scores.double().flatten(), torch.linspace(0, 1, n, dtype=torch.float64))
    never = 2.0 if criterion.higher_passes else -1.0
    return sorted({float(q) for q in qs} | {never}, reverse=criterion.higher_passes)


SELECTIONS = ("agreement", "accuracy")


def choose(points: list[Point], max_drop: float, select: str = "agreement", reference: float = 0.0) -> Point:
    """The point with the fewest average FLOPs that stays within `max_drop`:
    - "agreement": at most `max_drop` of the samples change their prediction from the final
      exit's. Changed predictions bound the accuracy drop from above whatever the labels, so
      this is steadier on a small validation split;
    - "accuracy": accuracy at least `reference - max_drop`, where exits that fix some samples
      and break others cancel out."""
    if select == "agreement":
        ok = [p for p in points if 1 - p.agreement <= max_drop + 1e-12]
    else:
        ok = [p for p in points if p.accuracy >= reference - max_drop - 1e-12]
    return min(ok, key=lambda p: (p.avg_flops, -p.accuracy)) if ok else max(points, key=lambda p: p.avg_flops)

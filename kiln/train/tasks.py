"""What a task trains on and how it is scored: the loss of one batch and the metric.

A model with a `loss(x, y) -> (loss, metrics)` method (VAE, DDPM) brings its own objective;
otherwise the dataset's task decides: cross-entropy for classification and language
modelling, scored by accuracy and perplexity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

IGNORE = -100   # targets outside a split (node classification) or padding


def forward(model: nn.Module, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class Metric:
    """Accumulates a task's metric over batches; `key` is the stable name in metrics.json."""

    key: str
    higher_is_better: bool
    total: float = 0.0
    count: float = 0.0
    extra: dict = field(default_factory=dict)

    def value(self) -> float:
        if self.count == 0:
            return float("nan")
        mean = self.total / self.count
        return math.exp(mean) if self.key == "perplexity" else mean

    def better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.higher_is_better else a < b)


def scored_by_own_loss(model: nn.Module) -> bool:
    """A model with its own `loss(x, y)` (a VAE, a diffusion model) is scored by it, unless it
    says its forward's outputs are what to score (`metric_from_forward`, e.g. an early-exit
    classifier once its threshold is set: it trains by its multi-exit loss, it answers by exits)."""
    return hasattr(model, "loss") and not getattr(model, "metric_from_forward", False)


def metric_for(task: str, model: nn.Module) -> Metric:
    if scored_by_own_loss(model):
        return Metric("loss", higher_is_better=False)
    if task == "language-modeling":
        return Metric("perplexity", higher_is_better=False)
    return Metric("accuracy", higher_is_better=True)


class LossForward(nn.Module):
    """Makes a model's own `loss(x, y)` its forward, so DDP (which hooks forward) can wrap it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)


def batch_loss(model: nn.Module, task: str, x, y, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """(mean loss of the batch, scalars for the metric): sums and counts, so averages are exact."""
    inner = getattr(model, "module", model)   # through a DDP wrapper
    custom = model if isinstance(inner, LossForward) else getattr(model, "loss", None)
    if callable(custom):
        loss, parts = custom(x, y)
        n = batch_size(x)
        return loss, {"sum": loss.detach().item() * n, "count": n, "parts": parts}
    return logits_loss(forward(model, x), task, y, label_smoothing)


def logits_loss(logits: torch.Tensor, task: str, y, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The task's loss of logits already computed (distillation reuses the student's)."""
    if task == "language-modeling":
        flat, target = logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)
        loss = F.cross_entropy(flat, target, ignore_index=IGNORE)
        n = int((target != IGNORE).sum())
        return loss, {"sum": loss.detach().item() * n, "count": n}
    loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE, label_smoothing=label_smoothing)
    mask = y != IGNORE
    correct = (logits.argmax(-1)[mask] == y[mask]).sum().item()
    return loss, {"sum": correct, "count": int(mask.sum()), "loss": loss.detach().item()}


def batch_size(x) -> int:
    t = next(iter(x.values())) if isinstance(x, dict) else x
    return t.shape[0]


@torch.no_grad()
def evaluate(model: nn.Module, task: str, loader, metric: Metric) -> float:
    """The metric over a whole split, in eval mode, in the loader's fixed order."""
    was_training = model.training
    model.eval()
    # objectives that sample (a diffusion model's timesteps) draw the same numbers every time
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        own = scored_by_own_loss(model)
        for x, y in loader:
            _, stats = batch_loss(model, task, x, y) if own else logits_loss(forward(model, x), task, y)
            metric.total += stats["sum"]
            metric.count += stats["count"]
    model.train(was_training)
    return metric.value()

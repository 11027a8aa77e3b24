"""Exit heads attached to a backbone at chosen block FQNs, by forward hooks.

Training (`loss(x, y)`) runs the whole backbone and returns the weighted mean of every exit's
cross-entropy, the final output included, so kiln's trainer trains the heads jointly (and the
backbone too unless it is frozen, DeeBERT's second stage). Inference with a threshold stops
per sample at the first exit whose criterion passes; the batch runs on while any sample is
left (masking), and stops the backbone as soon as none is. A threshold no sample ever passes
returns the backbone's own output exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from kiln.errors import KilnError
from kiln.registry import Registry

KIND = "early-exit"


@dataclass(frozen=True)
class Criterion:
    """A confidence score per sample and the direction in which it passes a threshold."""
    score: Callable[[torch.Tensor], torch.Tensor]
    higher_passes: bool

    def passes(self, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return scores >= threshold if self.higher_passes else scores <= threshold


CRITERIA: Registry[Criterion] = Registry("exit criterion")


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


CRITERIA.register("entropy")(Criterion(_entropy, higher_passes=False))       # nats; DeeBERT
CRITERIA.register("confidence")(Criterion(lambda z: F.softmax(z.float(), -1).amax(-1), higher_passes=True))


class ExitHead(nn.Module):
    """Pool a block's output to one vector per sample, then a linear classifier (an optional
    hidden layer with tanh before it, like BERT's pooler). Images: adaptive average pooling to
    pool x pool; token sequences: the mean over real tokens (the attention mask)."""

    def __init__(self, shape: tuple[int, ...], classes: int, pool: int = 1, hidden: int = 0):
        super().__init__()
        self.pool = pool
        features = shape[1] * pool * pool if len(shape) == 4 else shape[-1]
        layers: list[nn.Module] = [nn.Linear(features, hidden), nn.Tanh()] if hidden else []
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden or features, classes))

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if h.dim() == 4:
            h = F.adaptive_avg_pool2d(h, self.pool).flatten(1)
        elif h.dim() == 3:
            if mask is None:
                h = h.mean(1)
            else:
                m = mask.unsqueeze(-1).to(h.dtype)
                h = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return self.mlp(h)


class _Stop(Exception):
    """Raised from a hook when every sample of the batch has exited: the backbone stops there."""


def output_logits(out) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class EarlyExit(nn.Module):
    """`backbone` with `heads[k]` reading the output of block `exits[k]` (in execution order)."""

    def __init__(self, backbone: nn.Module, exits: list[str], heads: list[ExitHead], criterion: str = "entropy",
                 threshold: float | None = None, weights: list[float] | None = None, freeze_backbone: bool = True):
        super().__init__()
        if len(exits) != len(heads):
            raise ValueError("one head per exit")
        self.backbone, self.exits, self.heads = backbone, list(exits), nn.ModuleList(heads)
        self.criterion_name, self.criterion = criterion, CRITERIA.get(criterion)
        self.threshold = threshold
        self.weights = list(weights) if weights else [1.0] * (len(exits) + 1)
        if len(self.weights) != len(exits) + 1:
            raise KilnError(f"early exit: weights needs {len(exits) + 1} values (one per exit and the final output), "
                            f"got {len(self.weights)}")
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            for p in backbone.parameters():
                p.requires_grad_(False)
        self.last_exits: torch.Tensor | None = None   # per sample: the exit taken in the last forward

    def train(self, mode: bool = True) -> "EarlyExit":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()   # frozen means frozen: no dropout, no batch-norm statistics drift
        return self

    def _run(self, x_args: tuple, x_kwargs: dict, decide: Callable[[int, torch.Tensor], torch.Tensor | None]):
        """Run the backbone with a hook at every exit calling `decide(k, logits_k)`, which returns
        the samples that leave there (or None to take none); (exit logits, exits, final output)."""
        mask = x_kwargs.get("attention_mask")
        state: dict = {"logits": [], "done": None, "chosen": None, "exit": None}

        def hook(k: int):
            def fn(_m, _args, out):
                logits = self.heads[k](block_output(out), mask)
                state["logits"].append(logits)
                leave = decide(k, logits)
                if leave is None:
                    return None
                if state["done"] is None:
                    state["done"] = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
                    state["chosen"] = torch.zeros_like(logits)
                    state["exit"] = torch.full((logits.shape[0],), len(self.exits), dtype=torch.long)
                leave = leave & ~state["done"]
                state["chosen"][leave] = logits[leave].to(state["chosen"].dtype)
                state["exit"][leave] = k
                state["done"] |= leave
                if bool(state["done"].all()):
                    raise _Stop
                return None
            return fn

        handles = [self.backbone.get_submodule(f).register_forward_hook(hook(k)) for k, f in enumerate(self.exits)]
        final = None
        try:
            final = output_logits(self.backbone(*x_args, **x_kwargs))
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(state["logits"]) != len(self.exits) and final is not None:
            raise KilnError(f"early exit: the backbone ran {len(state['logits'])} of its {len(self.exits)} exit blocks "
                            f"once each; exits must be blocks that run exactly once per forward")
        return state, final

    def all_exits(self, *args, **kwargs) -> list[torch.Tensor]:
        """Every exit's logits and then the final output's, for the whole batch."""
        state, final = self._run(args, kwargs, lambda k, z: None)
        return state["logits"] + [final]

    @property
    def metric_from_forward(self) -> bool:
        """Scored by its answers (accuracy) once a threshold is set; by its loss while training heads."""
        return self.threshold is not None

    def loss(self, x, y) -> tuple[torch.Tensor, dict]:
        outs = self.all_exits(**x) if isinstance(x, dict) else self.all_exits(x)
        losses = [F.cross_entropy(z.float(), y) for z in outs]
        total = sum(w * l for w, l in zip(self.weights, losses)) / sum(self.weights)
        return total, {f"exit{k}": l.detach().item() for k, l in enumerate(losses)}

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The backbone's output without a threshold (or in training); with one, per sample the
        first exit that passes it, else the final output. `last_exits` says which exit each took."""
        if self.threshold is None or self.training:
            self.last_exits = None
            return output_logits(self.backbone(*args, **kwargs))
        t, crit = self.threshold, self.criterion
        return self._early(args, kwargs, lambda k, z: crit.passes(crit.score(z), t))

    def run_to(self, exit_index: int, *args, **kwargs) -> torch.Tensor:
        """Every sample leaves at exit `exit_index` (== len(exits): the final output), having
        evaluated the heads before it: what a sample that exits there costs."""
        return self._early(args, kwargs, lambda k, z: torch.full((z.shape[0],), k == exit_index))

    def _early(self, args, kwargs, decide) -> torch.Tensor:
        state, final = self._run(args, kwargs, decide)
        if state["done"] is None:                       # no exit decided anything: all final
            self.last_exits = torch.full((final.shape[0],), len(self.exits), dtype=torch.long)
            return final
        if final is not None:
            rest = ~state["done"]
            state["chosen"][rest] = final[rest].to(state["chosen"].dtype)
        self.last_exits = state["exit"]
        return state["chosen"]


def probe(backbone: nn.Module, exits: list[str], args: tuple, kwargs: dict) -> tuple[list[str], list[tuple], int]:
    """Run the backbone once: the exits in execution order, each one's output shape, and the
    number of classes of the final output. An exit that does not exist, does not run or runs
    twice is a KilnError naming it."""
    names = dict(backbone.named_modules())
    for f in exits:
        if f not in names or not f:
            raise KilnError(f"early exit: the model has no block {f!r} to attach an exit to")
    seen: list[tuple[str, tuple]] = []
    handles = [names[f].register_forward_hook(
        lambda _m, _a, out, f=f: seen.append((f, tuple(block_output(out).shape)))) for f in exits]
    try:
        with torch.no_grad():
            final = output_logits(backbone(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    counts = {f: sum(1 for g, _ in seen if g == f) for f in exits}
    for f, n in counts.items():
        if n != 1:
            raise KilnError(f"early exit: block {f!r} runs {n} times per forward; an exit needs a block that runs once")
    if final.dim() != 2:
        raise KilnError(f"early exit needs a classifier (batch x classes output), got output shape {tuple(final.shape)}")
    return [f for f, _ in seen], [s for _, s in seen], int(final.shape[-1])


def heads_for(shapes: list[tuple], classes: int, pool: int, hidden: int) -> list[ExitHead]:
    for s in shapes:
        if len(s) not in (2, 3, 4):
            raise KilnError(f"early exit: a block output of shape {s} has no head (need 2-D, 3-D tokens or 4-D images)")
    return [ExitHead(s, classes, pool, hidden) for s in shapes]


def entropy_bound(classes: int) -> float:
    """The largest entropy of `classes` outcomes (nats): an entropy threshold above it always exits."""
    return math.log(classes)

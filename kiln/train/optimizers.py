"""The optimizers a training config may name: one registry of builders, `params, cfg -> Optimizer`.

A builder reads the TrainConfig keys it needs (lr, weight_decay, momentum); registering one
more is a decorated function here (or in a plug-in module named in `plugins`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import torch

from kiln.registry import Registry

if TYPE_CHECKING:   # the config validates its optimizer against this registry
    from kiln.train.config import TrainConfig

Builder = Callable[[Iterable[torch.nn.Parameter], "TrainConfig"], torch.optim.Optimizer]
OPTIMIZERS: Registry[Builder] = Registry("optimizer")


@OPTIMIZERS.register("adamw")
def adamw(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("sgd")
def sgd(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The config's optimizer over the model's trainable parameters."""
    return OPTIMIZERS.get(cfg.optimizer)([p for p in model.parameters() if p.requires_grad], cfg)

"""The early-exit config: where the exits go, how they are trained and when a sample leaves.

    # e.toml
    exits = ["bert.encoder.layer.0", "bert.encoder.layer.1"]   # block FQNs, one head after each
    criterion = "entropy"        # entropy (exit when <= threshold) | confidence (max prob >= threshold)
    # threshold = 0.2            # fixed; default: chosen on the validation split, the fewest
    max_drop = 0.005             #   FLOPs within max_drop of the final exit, by `select`:
    select = "agreement"         #   agreement: at most max_drop of predictions changed (a bound on
                                 #   the accuracy drop); accuracy: accuracy within max_drop
    head_pool = 1                # images: adaptive average pooling to pool x pool before the head
    head_hidden = 0              # a tanh hidden layer of this width in each head (0: linear head)
    freeze_backbone = true       # train the heads only (DeeBERT's second stage); false: jointly
    weights = []                 # loss weight per exit and the final output (default: all 1)
    sweep_points = 41            # thresholds in the accuracy-vs-FLOPs curve
    latency_samples = 64         # test samples timed one at a time, dense and early exit
    [train]                      # TrainConfig keys for training the heads (epochs, lr, max_steps, ...)
    epochs = 1
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.adapt.early_exit import CRITERIA
from kiln.adapt.sweep import SELECTIONS
from kiln.config import from_dict
from kiln.errors import KilnError
from kiln.train.config import finetune_table


@dataclass(frozen=True)
class EarlyExitConfig:
    exits: tuple[str, ...]
    criterion: str = "entropy"
    threshold: float | None = None
    max_drop: float = 0.005
    select: str = "agreement"
    head_pool: int = 1
    head_hidden: int = 0
    freeze_backbone: bool = True
    weights: tuple[float, ...] = ()
    sweep_points: int = 41
    latency_samples: int = 64
    latency_repeats: int = 5
    seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):

        CRITERIA.get(self.criterion)
        checks = [
            (len(self.exits) >= 1, "exits needs at least one block FQN"),
            (len(set(self.exits)) == len(self.exits), "exits names a block twice"),
            (0 <= self.max_drop < 1, f"max_drop {self.max_drop} is outside [0, 1)"),
            (self.select in SELECTIONS, f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}"),
            (self.head_pool >= 1 and self.head_hidden >= 0, "head_pool must be >= 1 and head_hidden >= 0"),
            (not self.weights or len(self.weights) == len(self.exits) + 1,
             f"weights needs {len(self.exits) + 1} values (one per exit and the final output)"),
            (all(w >= 0 for w in self.weights) and (not self.weights or sum(self.weights) > 0),
             "weights must be >= 0 and not all 0"),
            (self.sweep_points >= 2 and self.latency_samples >= 1 and self.latency_repeats >= 1,
             "sweep_points must be >= 2, latency_samples and latency_repeats >= 1"),
        ]
        if self.threshold is not None and self.criterion == "confidence":
            checks.append((0 <= self.threshold <= 1, f"confidence threshold {self.threshold} is outside [0, 1]"))
        if self.threshold is not None and self.criterion == "entropy":
            checks.append((self.threshold >= 0, f"entropy threshold {self.threshold} must be >= 0"))
        for ok, message in checks:
            if not ok:
                raise KilnError(f"early-exit config: {message}")


def parse_config(table: dict[str, Any], where: str = "early-exit config") -> EarlyExitConfig:
    """An EarlyExitConfig from a TOML table; unknown keys and bad values are one-line KilnErrors."""
    if not isinstance(table, dict) or "exits" not in table:
        raise KilnError(f"{where}: exits needs a list of block FQNs")
    cfg = from_dict(EarlyExitConfig, table, where)
    train = finetune_table(cfg.train, where, "train") if cfg.train else {}
    if train.get("distill"):
        raise KilnError(f"{where}.train: distill does not apply: the exits train on their own loss")
    return cfg

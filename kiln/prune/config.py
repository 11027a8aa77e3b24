"""The pruning config: what to prune, how much, on which schedule, and how to fine-tune after.

    # p.toml
    method = "unstructured"        # unstructured | nm | structured
    criterion = "magnitude"        # magnitude | random | snip | movement (kiln.prune.criteria)
    reduction = "sum"              # structured: a unit's score is the sum (magnitude: L1) or l2 norm of its scores
    scope = "global"               # global | local (unstructured)
    ratio = 0.9                    # fraction of weights (structured: channels) removed, in [0, 1)
    n = 2                          # nm: N kept in every group of M
    m = 4
    schedule = "oneshot"           # oneshot | agp (cubic, during fine-tuning) | lottery (rewinding)
    [[rules]]                      # most specific first: fqn, then re, then type
    match = "fqn:fc2"
    ratio = 0.5                    # its own ratio (pruned locally); `skip = true` leaves it dense
    activation = 0.5               # zero this fraction of its outputs per sample
    [finetune]                     # TrainConfig keys for the fine-tune, plus distill = true
    epochs = 2
    lr = 1e-3
    distill = true                 # knowledge distillation from the unpruned model

An unknown key is an error naming it; a rule whose pattern matches no module is an error.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from kiln.config import from_dict, to_dict
from kiln.errors import KilnError
from kiln.prune.criteria import CRITERIA, Reduction
from kiln.rules import Match, least_specific_first
from kiln.train.config import finetune_table


class Method(enum.StrEnum):
    UNSTRUCTURED = "unstructured"
    NM = "nm"
    STRUCTURED = "structured"


class Scope(enum.StrEnum):
    GLOBAL = "global"        # one pool of weights over every target
    LOCAL = "local"          # each target at the ratio on its own


class Schedule(enum.StrEnum):
    ONESHOT = "oneshot"
    AGP = "agp"              # cubic growth during fine-tuning (Zhu & Gupta 2017)
    LOTTERY = "lottery"      # prune, rewind, retrain (Frankle & Carbin 2019)


class Rewind(enum.StrEnum):
    INIT = "init"            # the spec's initial weights
    SOURCE = "source"        # the weights pruning started from


@dataclass(frozen=True)
class Rule:
    match: Match
    skip: bool = False
    ratio: float | None = None
    activation: float | None = None

    def __post_init__(self):
        for key in ("ratio", "activation"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < 1:
                raise KilnError(f"prune config rule {self.match}: {key} {value!r} is outside [0, 1)")


@dataclass(frozen=True)
class Plan:
    """What a config means for one model: which modules at which ratio."""
    targets: tuple[str, ...]            # pruned at the config's ratio (one pool when global)
    overrides: dict[str, float]         # pruned at their own ratio, locally
    activations: dict[str, float]       # activation sparsity
    skipped: tuple[str, ...]            # targeted types a rule left dense


@dataclass(frozen=True)
class PruneConfig:
    method: Method = Method.UNSTRUCTURED
    criterion: str = "magnitude"
    reduction: Reduction = Reduction.SUM   # structured: how a unit's element scores become one score
    scope: Scope = Scope.GLOBAL
    ratio: float = 0.5
    n: int = 2
    m: int = 4
    targets: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")
    activation: float = 0.0              # activation sparsity on every target
    schedule: Schedule = Schedule.ONESHOT
    agp_initial: float = 0.0             # AGP: sparsity at the first step
    agp_end: float = 0.75                # AGP: fraction of fine-tuning steps over which sparsity grows
    agp_every: int = 10                  # AGP: masks recomputed every this many steps
    rounds: int = 3                      # lottery: prune-rewind-retrain rounds
    rewind: Rewind = Rewind.INIT         # lottery: rewind survivors to the spec's init or the source weights
    batches: int = 8                     # snip/movement/structured: data batches for the scores
    batch_size: int = 32
    round_to: int = 1                    # structured: keep channel counts multiples of this
    seed: int = 0
    keep_masks: bool = False             # save the masks as parametrizations (train on with them)
    rules: tuple[Rule, ...] = ()
    finetune: dict[str, Any] | None = None   # kiln.train.config.FINETUNE_KEYS -> value

    def __post_init__(self):
        checks = [
            (self.method in set(Method), f"method must be one of {', '.join(Method)}"),
            (self.scope in set(Scope), f"scope must be one of {', '.join(Scope)}"),
            (self.schedule in set(Schedule), f"schedule must be one of {', '.join(Schedule)}"),
            (self.rewind in set(Rewind), f"rewind must be one of {', '.join(Rewind)}"),
            (0 <= self.ratio < 1, f"ratio {self.ratio} is outside [0, 1)"),
            (0 <= self.activation < 1, f"activation {self.activation} is outside [0, 1)"),
            (self.method != "nm" or 0 < self.n < self.m, f"N:M {self.n}:{self.m} needs 0 < N < M"),
            (0 <= self.agp_initial <= self.ratio, "agp_initial must be in [0, ratio]"),
            (0 < self.agp_end <= 1, "agp_end must be in (0, 1]"),
            (self.agp_every >= 1 and self.rounds >= 1 and self.batches >= 1 and self.batch_size >= 1
             and self.round_to >= 1, "agp_every, rounds, batches, batch_size and round_to must be >= 1"),
            (self.schedule == "oneshot" or self.finetune is not None, f"schedule {self.schedule} needs a [finetune] section"),
            (self.schedule == "oneshot" or self.method == "unstructured",
             f"schedule {self.schedule} applies to unstructured pruning only"),
        ]
        for ok, message in checks:
            if not ok:
                raise KilnError(f"prune config: {message}")
        CRITERIA.get(self.criterion)

    def plan(self, model: nn.Module) -> Plan:
        """Resolve targets and rules against a model; a rule that matches nothing is an error."""
        targets, overrides, activations, skipped, used = [], {}, {}, [], set()
        for fqn, module in model.named_modules():
            name = type_name(module)
            rules = least_specific_first(self.rules, fqn, name)
            used.update(str(r.match) for r in rules)
            if name not in self.targets and not rules:
                continue
            skip, ratio, act = name not in self.targets, None, self.activation if name in self.targets else 0.0
            for r in rules:
                skip = r.skip
                ratio = r.ratio if r.ratio is not None else ratio
                act = r.activation if r.activation is not None else act
            if skip:
                if name in self.targets:
                    skipped.append(fqn)
                continue
            if ratio is not None:
                overrides[fqn] = ratio
            else:
                targets.append(fqn)
            if act:
                activations[fqn] = act
        unused = [str(r.match) for r in self.rules if str(r.match) not in used]
        if unused:
            raise KilnError(f"prune config: rule {unused[0]!r} matches no module of the model")
        if not targets and not overrides and not activations:
            raise KilnError(f"prune config: nothing to prune: no module of type {', '.join(self.targets)} "
                            f"is left by the rules")
        return Plan(tuple(targets), overrides, activations, tuple(skipped))


def type_name(module: nn.Module) -> str:
    """The module's class name, seen through a parametrization's generated subclass."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls.__name__


def parse_config(table: dict[str, Any], where: str = "prune config") -> PruneConfig:
    """A PruneConfig from a TOML table; unknown keys and bad values are one-line KilnErrors."""
    cfg = from_dict(PruneConfig, table, where)
    if cfg.finetune is not None:
        finetune_table(cfg.finetune, where)
    return cfg


def to_table(cfg: PruneConfig) -> dict[str, Any]:
    """The TOML/JSON table parse_config reads back to an equal config."""
    return to_dict(cfg)

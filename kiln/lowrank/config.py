"""The low-rank config: which modules to factorise, at which rank, and how to fine-tune after.

    # l.toml
    targets = ["Linear", "Conv2d"]   # module types (exact class names) the default applies to
    budget = 0.5                     # keep this fraction of each module's weights, in (0, 1)
    # energy = 0.9                   # or: keep this fraction of the squared singular values, (0, 1]
    # rank = 64                      # or: this rank (Conv2d: for both channel modes)
    [[rules]]                        # most specific first: fqn, then re, then type
    match = "re:.*classifier.*"
    skip = true
    [[rules]]
    match = "fqn:encoder.layer.0.output.dense"
    energy = 0.95                    # its own choice (one of budget, energy, rank)
    [finetune]                       # TrainConfig keys for the fine-tune, plus distill = true
    epochs = 1
    lr = 5e-5
    distill = true                   # knowledge distillation from the dense model

Linear layers get a truncated SVD, Conv2d layers a Tucker-2 (HOSVD). A rule that matches a
module of another type, a grouped conv, a weight shared with another module, or a rank that
would not save parameters leaves that module dense and says why in the report. A rule whose
pattern matches no module is an error.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from torch import nn

from kiln.config import from_dict
from kiln.errors import KilnError
from kiln.rules import Match, least_specific_first
from kiln.train.config import finetune_table

SUPPORTED = ("Linear", "Conv2d")
CHOICES = ("budget", "energy", "rank")
RULE_KEYS = ("match", "skip", *CHOICES)


@dataclass(frozen=True)
class Choice:
    """How one module's rank is chosen: by parameter budget, by energy, or fixed."""
    kind: str      # one of CHOICES
    value: float

    def __post_init__(self):
        check_choice(self.kind, self.value, "low-rank config")


def check_choice(kind: str, value: Any, where: str) -> None:
    if kind not in CHOICES:
        raise KilnError(f"{where}: unknown rank choice {kind!r}; accepted: {', '.join(CHOICES)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KilnError(f"{where}: {kind} needs a number, got {value!r}")
    if kind == "budget" and not 0 < value < 1:
        raise KilnError(f"{where}: budget {value!r} is outside (0, 1)")
    if kind == "energy" and not 0 < value <= 1:
        raise KilnError(f"{where}: energy {value!r} is outside (0, 1]")
    if kind == "rank" and (not isinstance(value, int) or value < 1):
        raise KilnError(f"{where}: rank {value!r} must be an integer >= 1")


@dataclass(frozen=True)
class Rule:
    match: Match
    skip: bool = False
    choice: Choice | None = None


@dataclass(frozen=True)
class Plan:
    """What a config means for one model: module -> choice, and the modules left dense, with why."""
    chosen: dict[str, Choice]
    skipped: dict[str, str]


@dataclass(frozen=True)
class LowRankConfig:
    choice: Choice
    targets: tuple[str, ...] = SUPPORTED
    rules: tuple[Rule, ...] = ()
    finetune: dict[str, Any] | None = None
    latency_batch: int = 32          # latency before/after is measured at this batch size
    latency_repeats: int = 20
    seed: int = 0

    def __post_init__(self):
        bad = [t for t in self.targets if t not in SUPPORTED]
        if bad:
            raise KilnError(f"low-rank config: module type {bad[0]!r} is not supported; supported: {', '.join(SUPPORTED)}")
        if self.latency_batch < 1 or self.latency_repeats < 1:
            raise KilnError("low-rank config: latency_batch and latency_repeats must be >= 1")

    def plan(self, model: nn.Module) -> Plan:
        """Resolve targets and rules against a model; a rule that matches nothing is an error."""
        chosen, skipped, used = {}, {}, set()
        for fqn, module in model.named_modules():
            name = type(module).__name__
            rules = least_specific_first(self.rules, fqn, name)
            used.update(str(r.match) for r in rules)
            if name not in self.targets and not rules:
                continue
            skip, choice = name not in self.targets, self.choice
            for r in rules:
                skip = r.skip
                choice = r.choice or choice
            if skip:
                if name in self.targets or rules:
                    skipped[fqn] = "skipped by a rule"
            elif name not in SUPPORTED:
                skipped[fqn] = f"module type {name} is not supported (only {', '.join(SUPPORTED)})"
            else:
                chosen[fqn] = choice
        unused = [str(r.match) for r in self.rules if str(r.match) not in used]
        if unused:
            raise KilnError(f"low-rank config: rule {unused[0]!r} matches no module of the model")
        return Plan(chosen, skipped)


def _one_choice(table: dict, where: str, required: bool) -> Choice | None:
    given = [k for k in CHOICES if k in table]
    if len(given) > 1:
        raise KilnError(f"{where}: set only one of {', '.join(CHOICES)}, got {', '.join(given)}")
    if not given:
        if required:
            raise KilnError(f"{where}: set one of {', '.join(CHOICES)} (how each module's rank is chosen)")
        return None
    check_choice(given[0], table[given[0]], where)
    return Choice(given[0], table[given[0]])


def _rule(r: Any, where: str) -> Rule:
    if not isinstance(r, dict):
        raise KilnError(f"{where}: needs a table")
    bad = sorted(set(r) - set(RULE_KEYS))
    if bad:
        raise KilnError(f"{where}: unknown key {bad[0]!r}; accepted: {', '.join(RULE_KEYS)}")
    return Rule(Match.parse(r.get("match"), where), bool(r.get("skip", False)), _one_choice(r, where, required=False))


def scalar_fields(cls: type, names: tuple[str, ...], data: dict[str, Any], where: str) -> dict[str, Any]:
    """The scalar keys of a config class, type-checked by kiln.config.from_dict (the structured
    ones -- rules, tables, lists -- are parsed by hand)."""
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    scalars = dataclasses.make_dataclass(cls.__name__, [(n, hints[n], dataclasses.field(default=defaults[n]))
                                                        for n in names], frozen=True)
    return dataclasses.asdict(from_dict(scalars, data, where))


def parse_config(table: dict[str, Any], where: str = "low-rank config") -> LowRankConfig:
    """A LowRankConfig from a TOML table; unknown keys and bad values are one-line KilnErrors."""
    scalars = ("latency_batch", "latency_repeats", "seed")
    accepted = (*CHOICES, "targets", "rules", "finetune", *scalars)
    unknown = sorted(set(table) - set(accepted))
    if unknown:
        raise KilnError(f"{where}: unknown key {unknown[0]!r}; accepted: {', '.join(accepted)}")
    targets = table.get("targets", list(SUPPORTED))
    if not isinstance(targets, list) or not all(isinstance(x, str) for x in targets):
        raise KilnError(f"{where}: targets needs a list of module type names, got {targets!r}")
    rules = table.get("rules", [])
    if not isinstance(rules, list):
        raise KilnError(f"{where}: rules needs a list of tables ([[rules]])")
    finetune = table.get("finetune")

    rest = scalar_fields(LowRankConfig, scalars, {k: table[k] for k in scalars if k in table}, where)
    return LowRankConfig(_one_choice(table, where, required=True), tuple(targets),
                         tuple(_rule(r, f"{where}.rules[{i}]") for i, r in enumerate(rules)),
                         None if finetune is None else finetune_table(finetune, where),
                         **rest)


def to_table(cfg: LowRankConfig) -> dict[str, Any]:
    """The TOML/JSON table parse_config reads back to an equal config."""
    table: dict[str, Any] = {cfg.choice.kind: cfg.choice.value, "targets": list(cfg.targets),
                             "latency_batch": cfg.latency_batch, "latency_repeats": cfg.latency_repeats,
                             "seed": cfg.seed}
    table["rules"] = [{"match": str(r.match), "skip": r.skip} | ({r.choice.kind: r.choice.value} if r.choice else {})
                      for r in cfg.rules]
    if cfg.finetune is not None:
        table["finetune"] = dict(cfg.finetune)
    return table

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

from dataclasses import dataclass
from typing import Any

from torch import nn

from kiln.config import from_dict, to_dict
from kiln.errors import KilnError
from kiln.rules import Match, least_specific_first
from kiln.train.config import finetune_table

SUPPORTED = ("Linear", "Conv2d")
CHOICES = ("budget", "energy", "rank")


@dataclass(frozen=True)
class Choice:
    """How one module's rank is chosen: by parameter budget, by energy, or fixed."""
    kind: str      # one of CHOICES
    value: int | float   # an int stays an int (a rank)

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


def _one_choice(table: dict, where: str, required: bool) -> dict:
    """The table with its one rank key (budget, energy or rank) folded into `choice`."""
    given = [k for k in CHOICES if k in table]
    if len(given) > 1:
        raise KilnError(f"{where}: set only one of {', '.join(CHOICES)}, got {', '.join(given)}")
    if not given and required:
        raise KilnError(f"{where}: set one of {', '.join(CHOICES)} (how each module's rank is chosen)")
    rest = {k: v for k, v in table.items() if k not in CHOICES}
    if given:
        check_choice(given[0], table[given[0]], where)
        rest["choice"] = {"kind": given[0], "value": table[given[0]]}
    return rest


def parse_config(table: dict[str, Any], where: str = "low-rank config") -> LowRankConfig:
    """A LowRankConfig from a TOML table; unknown keys and bad values are one-line KilnErrors."""
    if not isinstance(table, dict):
        raise KilnError(f"{where}: needs a table")
    if "choice" in table:
        raise KilnError(f"{where}: unknown key 'choice'; set one of {', '.join(CHOICES)}")
    data = _one_choice(table, where, required=True)
    rules = data.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise KilnError(f"{where}: rules needs a list of tables ([[rules]])")
    data["rules"] = [_one_choice(r, f"{where}.rules[{i}]", required=False) for i, r in enumerate(rules)]
    cfg = from_dict(LowRankConfig, data, where)
    if cfg.finetune is not None:
        finetune_table(cfg.finetune, where)
    return cfg


def _flat(table: dict[str, Any]) -> dict[str, Any]:
    choice = table.pop("choice", None)
    return table | ({choice["kind"]: choice["value"]} if choice else {})


def to_table(cfg: LowRankConfig) -> dict[str, Any]:
    """The TOML/JSON table parse_config reads back to an equal config."""
    table = _flat(to_dict(cfg))
    table["rules"] = [_flat(r) for r in table.get("rules", [])]
    return table

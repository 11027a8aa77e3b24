"""The quantization config: what to quantize, in which format, chosen per module by rules.

    # q.toml
    targets = ["Linear", "Conv2d"]          # module types the defaults apply to ("attention" too)
    weight = { format = "int", bits = 8 }   # defaults; a preset name also works: weight = "int8"
    input = { format = "int", bits = 8, calib = "percentile" }

    [[rules]]                               # most specific first: fqn, then re, then type
    match = "type:Embedding"
    weight = "int8"
    [[rules]]
    match = "re:.*classifier.*"
    skip = true

    [smoothquant]                           # optional, before calibration
    alpha = 0.5
    [gptq]                                  # optional: Hessian-guided rounding of the weights
    act_order = false                       # (groups: the weight quantizer's granularity)

A rule's weight/input/output replace the defaults for the modules it matches; `skip = true`
leaves them in float. A pattern that matches no module is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.errors import KilnError
from kiln.quant.quantizer import QSpec
from kiln.rules import Match, least_specific_first
from kiln.config import from_dict
from kiln.quant.modules import TYPE_NAMES

ROLES = ("weight", "input", "output")
TOP_KEYS = ("targets", "weight", "input", "output", "attention", "rules", "smoothquant", "gptq")
RULE_KEYS = ("match", "skip", "weight", "input", "output", "attention")


@dataclass(frozen=True)
class Rule:
    match: Match
    skip: bool = False
    specs: dict[str, QSpec | None] = field(default_factory=dict)   # only the roles it sets


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = 0.5


@dataclass(frozen=True)
class GPTQConfig:
    group_size: int = 128
    block: int = 128
    percdamp: float = 0.01
    act_order: bool = False


@dataclass(frozen=True)
class QuantConfig:
    targets: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")
    defaults: dict[str, QSpec | None] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    smoothquant: SmoothQuantConfig | None = None
    gptq: GPTQConfig | None = None
    source: dict[str, Any] = field(default_factory=dict)     # the table it was parsed from

    def resolve(self, fqn: str, type_name: str) -> tuple[bool, dict[str, QSpec | None]]:
        """(skip, role -> spec) for one module: defaults overridden by the matching rules,
        least specific first so the most specific (an exact FQN) has the last word."""
        matching = least_specific_first(self.rules, fqn, type_name)
        targeted = type_name in self.targets
        specs = dict(self.defaults) if targeted else {}
        skip = not targeted
        for rule in matching:
            skip = rule.skip
            specs |= rule.specs
        return skip, specs


def _spec(value: Any, where: str, role: str) -> QSpec | None:
    if value is False or value == "none" or value == "fp32":
        return None
    return QSpec.parse(value, where, "weight" if role == "weight" else "input")


def _specs(table: dict[str, Any], where: str) -> dict[str, QSpec | None]:
    out = {role: _spec(table[role], f"{where}.{role}", role) for role in ROLES if role in table}
    if "attention" in table:
        out["attention"] = _spec(table["attention"], f"{where}.attention", "input")
    return out


def parse_config(table: dict[str, Any], where: str = "quant config") -> QuantConfig:
    """A QuantConfig from a TOML table; unknown keys and bad values are one-line KilnErrors."""

    unknown = sorted(set(table) - set(TOP_KEYS))
    if unknown:
        raise KilnError(f"{where}: unknown key {unknown[0]!r}; accepted: {', '.join(TOP_KEYS)}")
    known_types = [*TYPE_NAMES, "attention"]
    targets = table.get("targets", list(QuantConfig.targets))
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise KilnError(f"{where}: targets needs a list of module type names, got {targets!r}")
    for t in targets:
        if t not in known_types:
            raise KilnError(f"{where}: unknown target {t!r}; supported: {', '.join(known_types)}")
    defaults = _specs(table, where)
    if not defaults and not table.get("rules"):
        raise KilnError(f"{where}: nothing to quantize: set weight, input, output or attention, or add rules")
    rules = []
    for i, r in enumerate(table.get("rules", [])):
        rw = f"{where}.rules[{i}]"
        if not isinstance(r, dict):
            raise KilnError(f"{rw}: needs a table")
        bad = sorted(set(r) - set(RULE_KEYS))
        if bad:
            raise KilnError(f"{rw}: unknown key {bad[0]!r}; accepted: {', '.join(RULE_KEYS)}")
        match = Match.from_config(r.get("match"), rw)
        if match.kind == "type" and match.pattern not in known_types:
            raise KilnError(f"{rw}: unknown type {match.pattern!r}; supported: {', '.join(known_types)}")
        rules.append(Rule(match, bool(r.get("skip", False)), _specs(r, rw)))

    sq = table.get("smoothquant")
    gq = table.get("gptq")
    if isinstance(gq, dict) and "group_size" in gq:
        raise KilnError(f"{where}.gptq: group_size comes from the weight quantizer: set "
                        "weight = { granularity = \"group\", group_size = N, ... } instead")
    return QuantConfig(
        targets=tuple(targets), defaults=defaults, rules=tuple(rules),
        smoothquant=from_dict(SmoothQuantConfig, sq, f"{where}.smoothquant") if sq is not None else None,
        gptq=from_dict(GPTQConfig, gq, f"{where}.gptq") if gq is not None else None,
        source=table)

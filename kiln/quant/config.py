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

from dataclasses import dataclass
from typing import Any, ClassVar

from kiln.config import from_dict, to_dict
from kiln.errors import KilnError
from kiln.quant.modules import TYPE_NAMES
from kiln.quant.quantizer import QSpec
from kiln.rules import Match, least_specific_first

ROLES = ("weight", "input", "output", "attention")
KNOWN_TYPES = (*TYPE_NAMES, "attention")


@dataclass(frozen=True)
class RoleSpec:
    """One role's setting as the file writes it: a QSpec from a preset name or a table, or
    `spec = None` for "keep this tensor in float" (written false, "none" or "fp32"), which a
    rule needs to undo a default."""

    spec: QSpec | None
    ROLE: ClassVar[str] = "input"        # activations default to per-tensor scales

    @classmethod
    def from_config(cls, value: Any, where: str) -> "RoleSpec":
        if value is False or value in ("none", "fp32"):
            return cls(None)
        return cls(QSpec.parse(value, where, cls.ROLE))

    def to_config(self) -> str | dict[str, Any]:
        return "none" if self.spec is None else self.spec.to_table()


class WeightSpec(RoleSpec):
    ROLE: ClassVar[str] = "weight"       # weights default to per-channel scales


def _specs(obj: Any) -> dict[str, QSpec | None]:
    """role -> spec for the roles `obj` (a QuantConfig or a Rule) sets."""
    return {role: getattr(obj, role).spec for role in ROLES if getattr(obj, role) is not None}


@dataclass(frozen=True)
class Rule:
    match: Match
    skip: bool = False
    weight: WeightSpec | None = None
    input: RoleSpec | None = None
    output: RoleSpec | None = None
    attention: RoleSpec | None = None

    def __post_init__(self):
        if self.match.kind == "type" and self.match.pattern not in KNOWN_TYPES:
            raise KilnError(f"quant config rule {self.match}: unknown type {self.match.pattern!r}; "
                            f"supported: {', '.join(KNOWN_TYPES)}")

    @property
    def specs(self) -> dict[str, QSpec | None]:
        """Only the roles the rule sets: they replace the defaults for the modules it matches."""
        return _specs(self)


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = 0.5


@dataclass(frozen=True)
class GPTQConfig:
    group_size: int = 128     # kiln.quant.gptq.gptq's own; a QuantConfig's groups are the weight quantizer's
    block: int = 128
    percdamp: float = 0.01
    act_order: bool = False


@dataclass(frozen=True)
class QuantConfig:
    targets: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")
    weight: WeightSpec | None = None
    input: RoleSpec | None = None
    output: RoleSpec | None = None
    attention: RoleSpec | None = None
    rules: tuple[Rule, ...] = ()
    smoothquant: SmoothQuantConfig | None = None
    gptq: GPTQConfig | None = None
    VERSION: ClassVar[int] = 1

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in KNOWN_TYPES]
        if unknown:
            raise KilnError(f"quant config: unknown target {unknown[0]!r}; supported: {', '.join(KNOWN_TYPES)}")
        if not self.defaults and not self.rules:
            raise KilnError("quant config: nothing to quantize: set weight, input, output or attention, or add rules")
        if self.gptq is not None and self.gptq.group_size != GPTQConfig.group_size:
            raise KilnError("quant config: gptq.group_size comes from the weight quantizer: set "
                            "weight = { granularity = \"group\", group_size = N, ... } instead")

    @property
    def defaults(self) -> dict[str, QSpec | None]:
        return _specs(self)

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


def parse_config(table: dict[str, Any], where: str = "quant config") -> QuantConfig:
    """A QuantConfig from a TOML table; unknown keys and bad values are one-line KilnErrors."""
    return from_dict(QuantConfig, table, where)


def to_table(config: QuantConfig) -> dict[str, Any]:
    """The TOML/JSON table parse_config reads back to an equal config (what a run records)."""
    return to_dict(config)

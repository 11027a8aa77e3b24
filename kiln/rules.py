"""Per-module rules shared by the compression configs: a rule matches a module by exact FQN,
by a regex over FQNs or by type name, and the most specific match has the last word."""
from __future__ import annotations

import re
from dataclasses import dataclass

from kiln.errors import KilnError

KINDS = ("fqn", "re", "type")
SPECIFICITY = {"fqn": 0, "re": 1, "type": 2}


@dataclass(frozen=True)
class Match:
    kind: str       # fqn | re | type
    pattern: str

    def matches(self, fqn: str, type_name: str) -> bool:
        if self.kind == "fqn":
            return fqn == self.pattern
        if self.kind == "re":
            return re.fullmatch(self.pattern, fqn) is not None
        return type_name == self.pattern

    def __str__(self) -> str:
        return f"{self.kind}:{self.pattern}"

    def to_config(self) -> str:
        return str(self)

    @classmethod
    def from_config(cls, match: object, where: str) -> "Match":
        """'fqn:NAME', 're:REGEX' or 'type:TYPE'; anything else is a one-line KilnError."""
        if not isinstance(match, str) or ":" not in match or match.split(":", 1)[0] not in KINDS:
            raise KilnError(f"{where}: match needs 'fqn:NAME', 're:REGEX' or 'type:TYPE', got {match!r}")
        kind, pattern = match.split(":", 1)
        if kind == "re":
            try:
                re.compile(pattern)
            except re.error as exc:
                raise KilnError(f"{where}: bad regex {pattern!r}: {exc}") from None
        return cls(kind, pattern)


def least_specific_first(rules, fqn: str, type_name: str) -> list:
    """The rules (each with a `.match: Match`) that match a module, so the last one applied wins."""
    return sorted((r for r in rules if r.match.matches(fqn, type_name)), key=lambda r: -SPECIFICITY[r.match.kind])

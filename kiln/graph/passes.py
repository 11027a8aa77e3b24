"""The pass contract and the pass manager every graph pass goes through.

A pass takes a Graph and returns a PassResult: the graph, whether it changed, and a typed
record of what it found or did. Passes hold their typed, frozen config themselves and never
mutate it. The manager runs passes in order, optionally until nothing changes, and runs a
verifier after each (tests use numerical equivalence against eager); a failure names the pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

from kiln.graph.graph import Graph

R = TypeVar("R")


@dataclass(frozen=True)
class PassResult(Generic[R]):
    graph: Graph
    modified: bool
    record: R


class Pass(Protocol):
    name: str

    def __call__(self, graph: Graph) -> PassResult: ...


class PassError(RuntimeError):
    """A pass (or the verifier after it) failed; the message names the pass."""


@dataclass
class PassManager:
    passes: Sequence[Pass]
    verify: Callable[[Graph], None] | None = None
    until_fixed_point: bool = False
    max_rounds: int = 10
    records: list[tuple[str, Any]] = field(default_factory=list)

    def run(self, graph: Graph) -> PassResult[list[tuple[str, Any]]]:
        self.records = []
        any_change = False
        for _ in range(self.max_rounds if self.until_fixed_point else 1):
            changed = False
            for p in self.passes:
                graph, modified = self._run_one(p, graph)
                changed |= modified
            any_change |= changed
            if not changed:
                break
        return PassResult(graph, any_change, list(self.records))

    def _run_one(self, p: Pass, graph: Graph) -> tuple[Graph, bool]:
        try:
            result = p(graph)
        except Exception as exc:
            raise PassError(f"pass {p.name} failed: {exc}") from exc
        if self.verify is not None:
            try:
                self.verify(result.graph)
            except Exception as exc:
                raise PassError(f"verification after pass {p.name} failed: {exc}") from exc
        self.records.append((p.name, result.record))
        return result.graph, result.modified

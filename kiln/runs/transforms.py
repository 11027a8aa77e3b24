"""Typed, versioned transform records and the registry of their restore functions.

A record is `{"kind": ..., "version": N, "config": {...}}`: what a transform did, as a table
(never a path, never a copied file), enough for its restore function to rebuild the
architecture on a freshly built model with no data and no randomness; the weights load after.
Each transform registers its restore with `@register_transform(KIND, version=N)`; the registry
imports the modules below when a kind is first looked up. A transform that changes how the
model runs without changing its shapes (number formats, sparsity, exits) also registers an
`execution(model, config) -> (model to capture, kiln.analysis.execution.Execution)`, so
`kiln analyze` costs the artifact as it runs (kiln.runs.execution).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from kiln.analysis.execution import Execution
from kiln.errors import KilnError
from kiln.registry import Registry

Restore = Callable[[nn.Module, dict], nn.Module]
Executes = Callable[[nn.Module, dict], "tuple[nn.Module, Execution]"]


@dataclass(frozen=True)
class Transform:
    kind: str
    version: int
    restore: Restore
    execution: Executes | None = None


TRANSFORMS: Registry[Transform] = Registry("model transform", plugins=(
    "kiln.prune.structured", "kiln.prune.unstructured", "kiln.prune.nm",
    "kiln.lowrank.restore", "kiln.lowrank.lora", "kiln.adapt.restore", "kiln.quant.apply",
))


def register_transform(kind: str, version: int = 1, execution: Executes | None = None
                       ) -> Callable[[Restore], Restore]:
    """`@register_transform("lowrank")` on `restore(model, config) -> model`."""
    def deco(fn: Restore) -> Restore:
        TRANSFORMS.register(kind)(Transform(kind, version, fn, execution))
        return fn

    return deco


@dataclass(frozen=True)
class TransformRecord:
    kind: str
    version: int
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, kind: str, config: dict[str, Any]) -> TransformRecord:
        """A record at the version of the restore registered for `kind`."""
        return cls(kind, TRANSFORMS.get(kind).version, dict(config))

    @classmethod
    def from_flat(cls, record: dict[str, Any]) -> TransformRecord:
        """From a capability's `{"kind": ..., **config}` dict."""
        if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
            raise ValueError(f"a transform record needs a 'kind': {record!r}")
        return cls.of(record["kind"], {k: v for k, v in record.items() if k != "kind"})

    @classmethod
    def from_json(cls, data: Any, where: str) -> TransformRecord:
        if not isinstance(data, dict) or set(data) != {"kind", "version", "config"} \
                or not isinstance(data["kind"], str) or not isinstance(data["version"], int) \
                or not isinstance(data["config"], dict):
            raise KilnError(f"{where}: a transform record needs exactly kind, version and config, got {data!r:.80}")
        return cls(data["kind"], data["version"], data["config"])

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version, "config": self.config}

    def restore(self, model: nn.Module) -> nn.Module:
        transform = TRANSFORMS.get(self.kind)
        if self.version > transform.version:
            raise KilnError(f"transform {self.kind!r} version {self.version} was written by a newer kiln; "
                            f"this one reads up to version {transform.version}")
        return transform.restore(model, self.config)

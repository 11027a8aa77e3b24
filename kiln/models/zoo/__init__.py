"""kiln's model zoo: one file per family, each model registered with its default input."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from kiln.models.loaded import LoadedModel
from kiln.registry import Registry


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str
    task: str
    dataset: str          # the default dataset it is trained/evaluated on
    default_input: str    # human-readable, e.g. "1x3x32x32 float32"
    description: str
    build: Callable[[], LoadedModel]


ZOO: Registry[ZooEntry] = Registry("zoo model")
_FAMILY_MODULES = ("mlp", "cnn", "imagenet", "cnn3d", "transformers", "gpt", "vit", "gnn", "vae", "diffusion")


def register(name: str, family: str, task: str, dataset: str, default_input: str, description: str):
    """Decorator for a zero-argument builder returning a LoadedModel."""

    def deco(build: Callable[[], LoadedModel]) -> Callable[[], LoadedModel]:
        ZOO.register(name)(ZooEntry(name, family, task, dataset, default_input, description, build))
        return build

    return deco


def _load_families() -> None:
    for mod in _FAMILY_MODULES:
        importlib.import_module(f"kiln.models.zoo.{mod}")


def entries() -> list[ZooEntry]:
    _load_families()
    return [ZOO.get(n) for n in ZOO.names()]


def load_zoo(name: str) -> LoadedModel:
    _load_families()
    entry = ZOO.get(name)
    loaded = entry.build()
    loaded.spec, loaded.family, loaded.task = f"zoo:{name}", entry.family, entry.task
    loaded.description = loaded.description or entry.description
    return loaded

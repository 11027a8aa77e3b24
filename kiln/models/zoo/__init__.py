"""kiln's model zoo: one file per family, each model registered with its default input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kiln.errors import KilnError
from kiln.models.loaded import LoadedModel
from kiln.registry import Registry


@dataclass(frozen=True)
class ZooEntry:
    name: str
    params: int           # parameter count, so `kiln models` lists without building (test_zoo checks it)
    family: str
    task: str
    dataset: str          # the default dataset it is trained/evaluated on
    default_input: str    # human-readable, e.g. "1x3x32x32 float32"
    description: str
    build: Callable[[], LoadedModel]


FAMILIES = ("mlp", "cnn", "imagenet", "cnn3d", "transformers", "gpt", "vit", "gnn", "vae", "diffusion")
ZOO: Registry[ZooEntry] = Registry("zoo model", plugins=tuple(f"kiln.models.zoo.{f}" for f in FAMILIES))


def register(name: str, params: int, family: str, task: str, dataset: str, default_input: str, description: str):
    """Decorator for a zero-argument builder returning a LoadedModel."""

    def deco(build: Callable[[], LoadedModel]) -> Callable[[], LoadedModel]:
        ZOO.register(name)(ZooEntry(name, params, family, task, dataset, default_input, description, build))
        return build

    return deco


def entries() -> list[ZooEntry]:
    return [ZOO.get(n) for n in ZOO.names()]


def load_zoo(name: str) -> LoadedModel:
    """`NAME`, or `NAME?classes=N` for a classifier with a fresh N-way head (transfer
    learning: the pretrained body kept, the last Linear replaced, seeded)."""
    name, _, query = name.partition("?")
    entry = ZOO.get(name)
    classes = _classes(name, entry, query)
    # builders seed torch for fixed weights: in a fork, so the caller's RNG state is untouched
    with torch.random.fork_rng(devices=[]):
        loaded = entry.build()
        if classes is not None:
            _new_head(loaded.model, classes)
    loaded.spec, loaded.family, loaded.task = f"zoo:{name}" + (f"?{query}" if query else ""), entry.family, entry.task
    loaded.description = loaded.description or entry.description
    return loaded


def _classes(name: str, entry: ZooEntry, query: str) -> int | None:

    if not query:
        return None
    key, _, value = query.partition("=")
    if key != "classes" or "&" in query:
        raise KilnError(f"zoo:{name}: unknown option {query.split('&')[0].split('=')[0]!r}; accepted: classes")
    if entry.task != "classification":
        raise KilnError(f"zoo:{name}: classes= needs a classification model; this one does {entry.task}")
    if not value.isdigit() or int(value) < 2:
        raise KilnError(f"zoo:{name}: classes must be an integer >= 2, got {value!r}")
    return int(value)


def _new_head(model, classes: int) -> None:
    """Replace the last nn.Linear (the classifier head) with a fresh classes-way one."""
    from torch import nn

    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    old = model.get_submodule(name)
    torch.manual_seed(0)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child,
            nn.Linear(old.in_features, classes, bias=old.bias is not None))

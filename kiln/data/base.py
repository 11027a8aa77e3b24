"""Datasets: one registry, one spec grammar (`NAME[?key=value&...]`), fixed seeded splits.

Every dataset loads to DataSplits: train/val/test torch Datasets whose samples are (x, y).
x is a tensor or a dict of tensors (passed to the model as keyword arguments); y is a tensor
(a class index, next-token targets, node labels with -100 where a node is not in the split).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch.utils.data import Dataset

from kiln.registry import Registry

TASKS = ("classification", "language-modeling", "node-classification", "generation")


@dataclass
class DataSplits:
    name: str
    task: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int | None = None
    sample_shape: tuple[int, ...] | None = None   # shape of one x when x is a tensor
    source: str = ""                              # where the data came from, in words
    info: dict[str, Any] = field(default_factory=dict)   # vocab_size, tokenizer, class names, ...


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    task: str
    description: str
    source: str
    options: dict[str, Any]                       # accepted query keys and their defaults
    load: Callable[..., DataSplits]               # load(seed=0, path=None, **options)


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def register(name: str, task: str, description: str, source: str, **options: Any):
    """Decorator for `load(seed: int = 0, path: str | None = None, **options) -> DataSplits`."""

    def deco(load: Callable[..., DataSplits]) -> Callable[..., DataSplits]:
        DATASETS.register(name)(DatasetEntry(name, task, description, source, options, load))
        return load

    return deco

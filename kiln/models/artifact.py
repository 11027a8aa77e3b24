"""Saved models whose architecture a compression changed, and one loader for every model source.

An artifact directory holds `artifact.json` (the spec the float model came from, its dataset,
and the transforms applied, in order, each a JSON record), `model.safetensors`, `report.json`
and `metrics.json`. Reloading builds the spec's model, lets each transform's registered
restore function rebuild the architecture from its record (no data, no randomness), then loads
the weights. So pruned, factorised or early-exit models train (`kiln train --init DIR`),
evaluate, quantize and compile like any other source, and compressions chain.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from kiln.errors import KilnError, first_line
from kiln.models.loaded import LoadedModel
from kiln.registry import Registry

ARTIFACT_FILE = "artifact.json"
Restore = Callable[[nn.Module, dict], nn.Module]
TRANSFORMS: Registry[Restore] = Registry("model transform")
# modules that register restore functions; imported when a kind is first needed, so importing
# kiln stays light
RESTORE_MODULES = (
    "kiln.prune.structured", "kiln.prune.unstructured", "kiln.prune.nm",
    "kiln.lowrank.restore", "kiln.adapt.restore",
)


def register_transform(kind: str) -> Callable[[Restore], Restore]:
    """`@register_transform("lowrank")` on `restore(model, record) -> model`."""
    return TRANSFORMS.register(kind)


def _restore_fn(kind: str) -> Restore:
    if kind not in TRANSFORMS:
        for name in RESTORE_MODULES:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name is None or not name.startswith(exc.name):
                    raise
    return TRANSFORMS.get(kind)


@dataclass
class Source:
    """A model ready to use, whatever the user named: a spec, a run, an artifact."""
    src: str                   # what the user gave
    spec: str                  # the spec the float model comes from
    dataset: str               # "" when nothing says which
    model: nn.Module
    loaded: LoadedModel        # the spec's example inputs (shapes do not change under compression)
    transforms: list = field(default_factory=list)

    @property
    def example_inputs(self) -> tuple:
        return self.loaded.example_inputs

    @property
    def example_kwargs(self) -> dict:
        return self.loaded.example_kwargs


def is_artifact(path: Path) -> bool:
    return (Path(path) / ARTIFACT_FILE).is_file()


def save_artifact(out: str | Path, model: nn.Module, *, spec: str, dataset: str, transforms: list[dict],
                  report: dict | None = None, metrics: dict | None = None) -> Path:
    """Write the whole directory or nothing: files go to a hidden sibling that is renamed into place."""
    from kiln.io import atomic_dir, atomic_write_json
    from kiln.train.checkpoint import save_weights

    for record in transforms:
        if not isinstance(record, dict) or "kind" not in record:
            raise ValueError(f"a transform record needs a 'kind': {record!r}")
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / ARTIFACT_FILE, {"spec": spec, "dataset": dataset, "transforms": transforms})
        save_weights(model, tmp / "model.safetensors")
        atomic_write_json(tmp / "report.json", report or {})
        atomic_write_json(tmp / "metrics.json", metrics or {})
    return Path(out)


def read_artifact(run_dir: str | Path) -> dict:
    path = Path(run_dir) / ARTIFACT_FILE
    if not path.is_file():
        raise KilnError(f"{run_dir} is not a kiln artifact directory: no {ARTIFACT_FILE}")
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta.get("spec"), str) or not isinstance(meta.get("transforms"), list):
            raise ValueError("needs 'spec' and 'transforms'")
    except (ValueError, AttributeError) as exc:
        raise KilnError(f"{path} is corrupt: {first_line(exc)}") from None
    return meta


def rebuild(spec: str, transforms: list[dict]) -> tuple[nn.Module, LoadedModel]:
    """The spec's model with every transform's architecture change re-applied (weights not loaded)."""
    from kiln.models.spec import load

    loaded = load(spec)
    model = loaded.model
    for record in transforms:
        model = _restore_fn(record.get("kind", "?"))(model, record)
    return model, loaded


def load_artifact(run_dir: str | Path) -> Source:
    from kiln.train.checkpoint import load_weights

    meta = read_artifact(run_dir)
    model, loaded = rebuild(meta["spec"], meta["transforms"])
    load_weights(model, Path(run_dir) / "model.safetensors")
    return Source(str(run_dir), meta["spec"], meta.get("dataset", ""), model.eval(), loaded, meta["transforms"])


def load_source(src: str, dataset: str | None = None) -> Source:
    """A model spec, a `kiln train` run (its best weights), an artifact or a quantized run."""
    from kiln.models.spec import load

    path = Path(src)
    if path.is_dir():
        source = _load_dir(path)
    elif ":" in src:
        from kiln.train.trainer import default_dataset

        loaded = load(src)
        source = Source(src, src, "", loaded.model.eval(), loaded)
        source.dataset = dataset or (default_dataset(src) if src.startswith("zoo:") else "")
    else:
        raise KilnError(f"{src!r} is neither a run directory nor a model spec (zoo:NAME, hf:PATH, ...)")
    if dataset:
        source.dataset = dataset
    return source


def _load_dir(path: Path) -> Source:
    from kiln.quant.run import is_quantized_run, load_quantized

    if is_artifact(path):
        return load_artifact(path)
    if is_quantized_run(path):
        from kiln.models.spec import load

        model, src = load_quantized(path)
        return Source(str(path), src["spec"], src.get("dataset", ""), model, load(src["spec"]),
                      [{"kind": "quant", "run": str(path)}])
    if (path / "config.toml").is_file():
        return _load_train_run(path)
    raise KilnError(f"{path} is not a kiln run directory: no config.toml, {ARTIFACT_FILE} or quant.toml")


def _load_train_run(path: Path) -> Source:
    from kiln.config import load_toml
    from kiln.train.checkpoint import load_weights
    from kiln.train.config import TrainConfig
    from kiln.train.trainer import architecture, default_dataset

    cfg = load_toml(TrainConfig, path / "config.toml")
    model, loaded, transforms = architecture(cfg, path)
    load_weights(model, path / "best.safetensors")
    dataset = cfg.dataset or (default_dataset(cfg.model) if cfg.model.startswith("zoo:") else "")
    return Source(str(path), cfg.model, dataset, model.eval(), loaded, transforms)

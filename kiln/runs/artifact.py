"""The one run directory every command that writes a model writes, and one loader for every
model source.

A run directory holds
- `artifact.json`: `{"format": 1, "spec": the spec the float model comes from, "dataset": ...,
  "data_seed": the seed of its train/val/test split, "transforms": [records, in the order
  applied]}` (kiln.runs.transforms),
- `model.safetensors`: every weight and buffer of the transformed model (quantizer scales too),
- `metrics.json` (kiln.runs.metrics, one schema for every command) and `report.json`,
- and whatever else its command keeps (`kiln train`: config.toml, last.safetensors, state.pt).
Reloading builds the spec's model, lets each record's registered restore rebuild the
architecture (no data, no randomness), then loads the weights, so any command's output is any
command's input: pruned, factorised, quantized or early-exit models train, evaluate, compress
further and compile like a spec.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from kiln.errors import KilnError, first_line
from kiln.io import atomic_dir, atomic_write_json
from kiln.models.loaded import LoadedModel
from kiln.models.spec import load
from kiln.models.zoo import ZOO
from kiln.runs.transforms import TransformRecord
from kiln.runs.weights import load_weights, save_weights

FORMAT = 1
ARTIFACT_FILE = "artifact.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.json"
QUANT = "quant"   # the quantization transform's kind: a quantized model is compressed last


@dataclass
class Source:
    """A model ready to use, whatever the user named: a spec or a run directory."""
    src: str                   # what the user gave
    spec: str                  # the spec the float model comes from
    dataset: str               # "" when nothing says which
    model: nn.Module
    loaded: LoadedModel        # the spec's example inputs (shapes do not change under compression)
    transforms: list[TransformRecord] = field(default_factory=list)
    data_seed: int = 0         # the seed of the dataset's split the model was made and measured on

    @property
    def example_inputs(self) -> tuple:
        return self.loaded.example_inputs

    @property
    def example_kwargs(self) -> dict:
        return self.loaded.example_kwargs

    @property
    def quantized(self) -> bool:
        return any(t.kind == QUANT for t in self.transforms)


@dataclass(frozen=True)
class ArtifactMeta:
    spec: str
    dataset: str
    transforms: tuple[TransformRecord, ...]
    data_seed: int = 0


def default_dataset(spec: str) -> str:
    """The dataset a zoo model is meant for; other specs name theirs with --dataset."""
    if spec.startswith("zoo:"):
        return ZOO.get(spec[4:].partition("?")[0]).dataset
    raise KilnError(f"{spec} has no default dataset: pass --dataset (see `kiln datasets`)")


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / ARTIFACT_FILE).is_file()


def write_meta(directory: Path, *, spec: str, dataset: str, transforms: list[TransformRecord],
               data_seed: int = 0) -> None:
    for record in transforms:
        if not isinstance(record, TransformRecord):
            raise TypeError(f"a transform must be a TransformRecord, got {record!r:.80}")
    meta = {"format": FORMAT, "spec": spec, "dataset": dataset, "data_seed": data_seed,
            "transforms": [t.to_json() for t in transforms]}
    atomic_write_json(Path(directory) / ARTIFACT_FILE, meta)


def save_source(out: str | Path, source: Source, model: nn.Module, record: TransformRecord | None = None, *,
                report: dict | None = None, metrics: dict | None = None) -> Path:
    """Save what a command made of `source`: its transforms, then the command's own `record`."""
    transforms = [*source.transforms, *([record] if record is not None else [])]
    return save_artifact(out, model, spec=source.spec, dataset=source.dataset, transforms=transforms,
                         data_seed=source.data_seed, report=report, metrics=metrics)


def save_artifact(out: str | Path, model: nn.Module, *, spec: str, dataset: str, transforms: list[TransformRecord],
                  data_seed: int = 0, report: dict | None = None, metrics: dict | None = None) -> Path:
    """The one way a command saves a model: the whole directory or nothing (it is filled in a
    hidden sibling that is renamed into place)."""
    with atomic_dir(out) as tmp:
        write_meta(tmp, spec=spec, dataset=dataset, transforms=transforms, data_seed=data_seed)
        save_weights(model, tmp / WEIGHTS_FILE)
        atomic_write_json(tmp / REPORT_FILE, report or {})
        atomic_write_json(tmp / METRICS_FILE, metrics or {})
    return Path(out)


def read_artifact(run_dir: str | Path) -> ArtifactMeta:
    path = Path(run_dir) / ARTIFACT_FILE
    if not path.is_file():
        raise KilnError(_not_a_run(Path(run_dir)))
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta.get("spec"), str) or not isinstance(meta.get("transforms"), list):
            raise ValueError("needs 'spec' and 'transforms'")
    except (ValueError, AttributeError) as exc:
        raise KilnError(f"{path} is corrupt: {first_line(exc)}") from None
    if "format" not in meta:
        transforms = tuple(_legacy_record(r, run_dir) for r in meta["transforms"])
    elif meta["format"] == FORMAT:
        transforms = tuple(TransformRecord.from_json(r, str(path)) for r in meta["transforms"])
    else:
        raise KilnError(f"{path} has run format {meta['format']!r}; this kiln reads format {FORMAT}")
    seed = meta.get("data_seed", 0)
    if not isinstance(seed, int):
        raise KilnError(f"{path} is corrupt: data_seed needs an integer, got {seed!r}")
    return ArtifactMeta(meta["spec"], str(meta.get("dataset") or ""), transforms, seed)


def _legacy_record(record, run_dir) -> TransformRecord:
    """Records of kiln's first artifact format were flat `{"kind": ..., **config}` dicts."""
    if isinstance(record, dict) and record.get("kind") == QUANT:
        raise KilnError(f"{run_dir} was pruned or factorised after quantization, which cannot be restored: "
                        f"redo it on the float model, then `kiln quantize` the result")
    try:
        return TransformRecord.from_flat(record)
    except ValueError as exc:
        raise KilnError(f"{Path(run_dir) / ARTIFACT_FILE} is corrupt: {exc}") from None


def _not_a_run(path: Path) -> str:
    """What to say about a directory that has no artifact.json: those earlier kiln wrote name
    the command that writes them again."""
    if not path.is_dir():
        return f"run directory {path} does not exist"
    if (path / "quant.toml").is_file() and (path / "source.toml").is_file():
        try:
            src = json.dumps(tomllib.loads((path / "source.toml").read_text()).get("src", "SRC"))
        except (ValueError, OSError):
            src = "SRC"
        return (f"{path} is a quantized run of an earlier kiln (quant.toml, no {ARTIFACT_FILE}): quantize it again "
                f"with `kiln quantize {src} --config {path / 'quant.toml'} --out NEW_DIR`")
    if (path / "config.toml").is_file():
        return (f"{path} is a `kiln train` run of an earlier kiln (no {ARTIFACT_FILE}): train it again with "
                f"`kiln train --config {path / 'config.toml'} --out NEW_DIR`")
    return f"{path} is not a kiln run directory: no {ARTIFACT_FILE}"


def rebuild(spec: str, transforms: list[TransformRecord] | tuple[TransformRecord, ...]) -> tuple[nn.Module, LoadedModel]:
    """The spec's model with every transform's architecture change re-applied (weights not loaded)."""
    loaded = load(spec)
    model = loaded.model
    for record in transforms:
        model = record.restore(model)
    return model, loaded


def load_artifact(run_dir: str | Path, weights: str = WEIGHTS_FILE) -> Source:
    meta = read_artifact(run_dir)
    model, loaded = rebuild(meta.spec, meta.transforms)
    load_weights(model, Path(run_dir) / weights)
    return Source(str(run_dir), meta.spec, meta.dataset, model.eval(), loaded, list(meta.transforms), meta.data_seed)


def load_source(src: str, dataset: str | None = None) -> Source:
    """A model spec or any kiln run directory (`kiln train`, `quantize`, `prune`, ...)."""
    if Path(src).is_dir():
        source = load_artifact(src)
    elif ":" in src:
        loaded = load(src)
        source = Source(src, src, "", loaded.model.eval(), loaded)
        source.dataset = dataset or (default_dataset(src) if src.startswith("zoo:") else "")
    else:
        raise KilnError(f"{src!r} is neither a run directory nor a model spec (zoo:NAME, hf:PATH, ...)")
    if dataset:
        source.dataset = dataset
    return source


def require_float(source: Source, command: str) -> Source:
    """Quantization comes last in a chain: pruning, factorising or attaching exits to a quantized
    model would change weights its quantizers' scales were calibrated for."""
    if source.quantized:
        raise KilnError(f"{source.src} is quantized: run `kiln {command}` on the model before quantization, "
                        f"then `kiln quantize` its result (quantize last)")
    return source

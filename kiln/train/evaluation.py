"""Evaluation and data batches, written once for every command: a split's metric, the
calibration batches, labelled batches for scores, and `kiln eval DIR`."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from kiln.data import load_dataset
from kiln.errors import KilnError, first_line
from kiln.runs.artifact import METRICS_FILE, load_artifact
from kiln.runs.metrics import final
from kiln.train import tasks


def _whole(samples):
    """A node-classification sample is a whole graph: no batch dimension is added."""
    return samples[0]


def eval_loader(ds, task: str, batch_size: int = 256) -> DataLoader:
    """A whole split in its fixed order."""
    if task == "node-classification":
        return DataLoader(ds, batch_size=1, shuffle=False, collate_fn=_whole)
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def source_splits(source):
    """The dataset split a source was made and measured on (kiln.runs.artifact.Source)."""

    if not source.dataset:
        raise KilnError(f"{source.src} has no dataset: pass --dataset (see `kiln datasets`)")
    return load_dataset(source.dataset, seed=source.data_seed)


def evaluate_model(model: nn.Module, splits, split: str = "test", batch_size: int = 256) -> tuple[str, float]:
    """(metric name, value) of `model` on one split of `splits` (kiln.data.DataSplits)."""
    metric = tasks.metric_for(splits.task, model)
    loader = eval_loader(getattr(splits, split), splits.task, batch_size)
    return metric.key, tasks.evaluate(model, splits.task, loader, metric)


def labelled_batches(splits, n: int, batch_size: int, seed: int) -> list[tuple]:
    """The first `n` (inputs, targets) batches of the training split in a seeded shuffle."""
    if splits.task == "node-classification":
        return [splits.train[0]]
    loader = DataLoader(splits.train, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    batches = []
    for batch in loader:
        batches.append(tuple(batch))
        if len(batches) == n:
            break
    return batches


def calibration_batches(splits, n: int, batch_size: int, seed: int) -> list:
    """The inputs of `labelled_batches` (what calibration and SmoothQuant/GPTQ statistics see)."""
    return [x for x, _ in labelled_batches(splits, n, batch_size, seed)]


def check_batches(model: nn.Module, batches: list, where: str, forward=tasks.forward) -> None:
    """One batch through the model (as `forward` runs it): data of the wrong shape fails here, not mid-way."""
    try:
        with torch.no_grad():
            forward(model, batches[0])
    except Exception as exc:
        raise KilnError(f"{where} does not fit the model: {first_line(exc)}") from None


def evaluate_run(run_dir: str | Path) -> dict:
    """`kiln eval`: reload any run directory's model and measure its metric on the test split
    again; `recorded` is what its command stored (kiln.runs.metrics.final)."""
    run = Path(run_dir)
    src = load_artifact(run)
    stored = {}
    if (run / METRICS_FILE).is_file():
        try:
            stored = json.loads((run / METRICS_FILE).read_text())
            stored.get("metric")
        except (json.JSONDecodeError, AttributeError):
            raise KilnError(f"{run / METRICS_FILE} is corrupt: not a JSON object") from None
    # the batch size the command measured with: a mean over other batches rounds differently
    key, value = evaluate_model(src.model, source_splits(src), batch_size=int(stored.get("eval_batch_size", 256)))
    recorded = final(stored) if stored.get("metric") == key else None
    return {"run": str(run), "model": src.spec, "dataset": src.dataset, "metric": key, "value": value,
            "split": "test", "recorded": recorded, "reproduced": recorded == value if recorded is not None else None}

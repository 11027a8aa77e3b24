"""Fine-tuning a transformed model (pruned, factorised, with exit heads) with kiln's trainer,
optionally distilled from the model it was made from: one path for every capability."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from kiln.config import from_dict
from kiln.runs.artifact import WEIGHTS_FILE, Source, save_artifact
from kiln.runs.transforms import TransformRecord
from kiln.runs.weights import load_weights
from kiln.train.config import TrainConfig
from kiln.train.trainer import LAST_FILE, Hook, fit

KEEP = ("epochs", "steps", "best_epoch", "train_time_s", "metric", "val", "history")


def finetune(model: nn.Module, source: Source, transforms: Sequence[TransformRecord], table: dict[str, Any], *,
             hooks: Sequence[Hook] = (), best: bool = True, progress: bool = True,
             log: Callable[[str], None] = lambda s: None) -> dict:
    """Train `model` (whose architecture `transforms` rebuild from `source.spec`) from its current
    weights with the [finetune] table's TrainConfig keys, the source as teacher when `distill`;
    the best validation weights (the last with `best=False`: a schedule that moves masks ends
    where it ends) are loaded back into `model`. Returns what the training reported."""
    ft = dict(table)
    distill = ft.pop("distill", False)
    with tempfile.TemporaryDirectory(prefix="kiln-finetune-") as tmp:
        init = save_artifact(Path(tmp) / "init", model, spec=source.spec, dataset=source.dataset,
                             transforms=list(transforms), data_seed=source.data_seed)
        cfg = from_dict(TrainConfig, ft | {"model": source.spec, "dataset": source.dataset, "init": str(init),
                                           "out": str(Path(tmp) / "train"), "teacher": source.src if distill else "",
                                           "seed": ft.get("seed", source.data_seed)},
                        "finetune")
        log(f"fine-tuning: {cfg.epochs} epochs{f', at most {cfg.max_steps} steps' if cfg.max_steps else ''}"
            f"{', distilled from ' + source.src if distill else ''}")
        metrics = fit(cfg, progress=progress, hooks=hooks)
        load_weights(model, Path(tmp) / "train" / (WEIGHTS_FILE if best else LAST_FILE))
    return {k: metrics[k] for k in KEEP if k in metrics} | {"distill": distill, "weights": "best" if best else "last",
                                                           "config": dict(table)}

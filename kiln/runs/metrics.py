"""metrics.json: one schema for every command that writes a model.

    {"metric": "accuracy" | "perplexity" | "loss", "split": "test",
     "before": the source's value (null where not measured),
     "after": the value of the model the command made,
     "after_finetune": the value after fine-tuning (only where the command fine-tuned),
     "model": spec, "source": what the command read, "dataset": ..., and the command's own extras}

`kiln eval DIR` measures the saved model again and compares with `final(metrics)`.
"""
from __future__ import annotations

from typing import Any

METRICS = ("accuracy", "perplexity", "loss")


def metric_record(metric: str, *, split: str = "test", before: float | None, after: float,
                  after_finetune: float | None = None, **extra: Any) -> dict[str, Any]:
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    record = {"metric": metric, "split": split, "before": before, "after": after}
    if after_finetune is not None:
        record["after_finetune"] = after_finetune
    return record | extra


def final(metrics: dict[str, Any]) -> float | None:
    """The value of the saved model: after fine-tuning where there was one, else after."""
    value = metrics.get("after_finetune", metrics.get("after"))
    return value if isinstance(value, (int, float)) else None

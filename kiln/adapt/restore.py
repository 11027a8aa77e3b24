"""Re-attach exit heads from an early-exit transform record (their weights load afterwards)."""
from __future__ import annotations

from torch import nn

from kiln.adapt.early_exit import KIND, EarlyExit, ExitHead
from kiln.analysis.execution import Execution
from kiln.errors import KilnError
from kiln.runs.transforms import register_transform


def record_of(model: EarlyExit, shapes: list[tuple], classes: int, pool: int, hidden: int) -> dict:
    return {"kind": KIND, "exits": list(model.exits), "shapes": [list(s) for s in shapes], "classes": classes,
            "pool": pool, "hidden": hidden, "criterion": model.criterion_name, "threshold": model.threshold,
            "weights": list(model.weights), "freeze_backbone": model.freeze_backbone}


def _execution(model: nn.Module, record: dict) -> tuple[nn.Module, Execution]:
    # which exit a sample takes depends on its data: the graph is the full backbone, the bound of
    # the sample that exits last; report.json holds the exact average FLOPs per threshold
    model.threshold = None
    note = ("early exit: costed as the sample that runs the whole backbone (the exits a sample takes depend on its "
            "data; the run's report.json has the average FLOPs per threshold)")
    return model, Execution({}, (note,))


@register_transform(KIND, execution=_execution)
def restore(model: nn.Module, record: dict) -> nn.Module:
    try:
        heads = [ExitHead(tuple(s), int(record["classes"]), int(record["pool"]), int(record["hidden"]))
                 for s in record["shapes"]]
        exits = list(record["exits"])
    except (KeyError, TypeError, ValueError) as exc:
        raise KilnError(f"early-exit transform record is incomplete: {exc}") from None
    for f in exits:
        try:
            model.get_submodule(f)
        except AttributeError:
            raise KilnError(f"early-exit record names block {f!r}, which the model does not have") from None
    return EarlyExit(model, exits, heads, record.get("criterion", "entropy"), record.get("threshold"),
                     record.get("weights"), bool(record.get("freeze_backbone", True)))

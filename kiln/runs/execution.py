"""A run directory as it runs: the model to capture and how each module executes.

Each transform record's registered `execution` (kiln.runs.transforms) turns the restored
model into what a deployment would run (fake quantization unwrapped to the float op it
simulates, pruning masks made permanent) and says how its modules run (number formats,
sparsity); transforms that only change shapes (structured pruning, low-rank factors) need
none: their shapes are already the real ones.
"""
from __future__ import annotations

from torch import nn

from kiln.analysis.execution import Execution
from kiln.runs.transforms import TRANSFORMS, TransformRecord


def as_it_runs(model: nn.Module, transforms: list[TransformRecord] | tuple[TransformRecord, ...]
               ) -> tuple[nn.Module, Execution]:
    """(the model to capture, its Execution), the transforms' hooks applied in order."""
    execution = Execution()
    for record in transforms:
        hook = TRANSFORMS.get(record.kind).execution
        if hook is not None:
            model, more = hook(model, record.config)
            execution = execution.merged(more)
    return model, execution

"""Sharded checkpoints through torch.distributed.checkpoint (DCP).

At each epoch's checkpoint every rank of a parallel run writes its shards of the weights, the
buffers and the optimizer states into `RUN/sharded/` (DTensor shards as they lie, replicated
tensors once), keyed by the plain model's parameter names, so the checkpoint does not depend
on the plan that wrote it: `load_sharded` reads it into a plain model in one process, and
DCP's resharding reads it into any other plan. It is written to `sharded.tmp` and renamed once
every rank has finished, so a kill leaves the previous one whole. Across machines DCP needs the
run directory on a shared file system.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from kiln.errors import KilnError, first_line

SHARDED = "sharded"


def save_sharded(state: dict, run_path: Path | None) -> None:
    """Collective: every rank writes its part of `state` under rank 0's `run_path`."""
    where = [str(run_path) if run_path is not None else None]
    dist.broadcast_object_list(where, src=0)
    if where[0] is None:
        return
    final, staged = Path(where[0]) / SHARDED, Path(where[0]) / f"{SHARDED}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(staged, ignore_errors=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(staged))
    dist.barrier()
    if dist.get_rank() == 0:
        old = Path(where[0]) / f"{SHARDED}.old"
        if final.exists():
            final.rename(old)
        staged.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_sharded(run_dir: str | Path, model: nn.Module) -> None:
    """A parallel run's sharded checkpoint into a plain model, in this one process (N -> 1)."""
    path = Path(run_dir) / SHARDED
    if not path.is_dir():
        raise KilnError(f"{run_dir} has no sharded checkpoint ({SHARDED}/): only parallel runs write one")
    tensors = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    state = {"model": {n: t.detach().clone() for n, t in tensors.items()}}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as exc:
        raise KilnError(f"sharded checkpoint {path} does not fit the model: {first_line(exc)}") from None
    with torch.no_grad():
        for n, t in tensors.items():
            t.copy_(state["model"][n])

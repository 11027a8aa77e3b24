"""Parallel training modes (one module per family of modes), their typed plan and registry.

`kiln train SPEC --nproc N --parallel MODE` runs each rank's `fit` with the engine registered
under MODE (registry.MODES): data.py (ddp, zero1, fsdp, hsdp), tp.py (tp; fsdp,tp; ddp,tp), pp.py
(pp; ddp,pp). engine.py is the interface the trainer calls.
"""
from kiln.train.parallel.config import Mode, ParallelConfig, PipeSchedule

__all__ = ["Mode", "ParallelConfig", "PipeSchedule"]

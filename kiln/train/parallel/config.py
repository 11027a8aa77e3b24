"""`kiln train --parallel MODE[,MODE] --nproc N [--mesh AxB]`: the typed parallel plan.

One frozen config names the modes (one per mesh dimension, outermost first), the mesh and
each mode's options; it is checked here, before any process starts, against what can be known
without the model (counts, combinations), and against the model in `check_model`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from kiln.errors import KilnError


class Mode(enum.StrEnum):
    """One way to split a training step over processes."""
    DDP = "ddp"       # replicated model, gradients all-reduced (DistributedDataParallel)
    FSDP = "fsdp"     # FSDP2 fully_shard: parameters, gradients and optimizer states sharded
    HSDP = "hsdp"     # FSDP2 on a 2-D mesh: replicated across the first dimension, sharded in the second
    ZERO1 = "zero1"   # DDP with the optimizer states sharded (ZeroRedundancyOptimizer)
    PP = "pp"         # pipeline stages (torch.distributed.pipelining, manual PipelineStage)
    TP = "tp"         # tensor parallel (DTensor parallelize_module, column/row-wise plans)


class PipeSchedule(enum.StrEnum):
    """torch.distributed.pipelining's schedules, by the names users know them by."""
    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED = "interleaved-1f1b"
    ZERO_BUBBLE = "zero-bubble"

    @property
    def looped(self) -> bool:
        """Several stages per rank (stage s on rank s mod p)."""
        return self in (PipeSchedule.INTERLEAVED, PipeSchedule.ZERO_BUBBLE)


DATA_MODES = (Mode.DDP, Mode.FSDP, Mode.ZERO1, Mode.HSDP)
# (outer, inner) pairs on a 2-D mesh; HSDP is 2-D by itself
PAIRS = {(Mode.DDP, Mode.PP), (Mode.DDP, Mode.TP), (Mode.FSDP, Mode.TP)}


@dataclass(frozen=True)
class ParallelConfig:
    modes: tuple[Mode, ...] = (Mode.DDP,)
    mesh: tuple[int, ...] = ()           # processes per mesh dimension, outermost first; () = all on one
    reshard_after_forward: bool = True   # fsdp: True frees gathered parameters after forward (ZeRO-3),
                                         # False keeps them to backward (ZeRO-2-like: less communication)
    schedule: PipeSchedule = PipeSchedule.ONE_F_ONE_B
    microbatches: int = 0                # pp: micro-batches per step (0: 2 x the number of stages)
    split: tuple[str, ...] = ()          # pp: module names where a stage begins (empty: balanced by FLOPs)
    stages_per_rank: int = 1             # pp: >1 for the looped schedules (interleaved, zero-bubble)
    checkpoint_activations: bool = False  # recompute each block's activations in backward
    sequence_parallel: bool = False      # tp: norms and residuals sharded along the sequence
    mmap_threshold: int | None = None    # glibc's mmap threshold for the workers (bytes; None: kiln's
                                         # choice for the modes, allocator_env; 0: glibc's own)

    def __post_init__(self):
        modes = tuple(Mode(m) for m in self.modes)
        object.__setattr__(self, "modes", modes)
        object.__setattr__(self, "schedule", PipeSchedule(self.schedule))
        combos = ", ".join([m.value for m in Mode] + [f"{a},{b}" for a, b in sorted(PAIRS)])
        if not modes or len(modes) > 2 or len(set(modes)) != len(modes):
            raise KilnError(f"--parallel {','.join(modes)}: one mode or a pair; accepted: {combos}")
        if len(modes) == 2 and tuple(modes) not in PAIRS:
            raise KilnError(f"--parallel {','.join(modes)} is not a supported pair; accepted: {combos}")
        dims = 2 if (len(modes) == 2 or modes == (Mode.HSDP,)) else 1
        if self.mesh and len(self.mesh) != dims:
            raise KilnError(f"--mesh {'x'.join(map(str, self.mesh))} has {len(self.mesh)} dimensions; "
                            f"--parallel {','.join(modes)} needs {dims} (e.g. --mesh 2x2)")
        if any(n < 1 for n in self.mesh):
            raise KilnError(f"--mesh sizes must be >= 1, got {'x'.join(map(str, self.mesh))}")
        if self.mmap_threshold is not None and self.mmap_threshold < 0:
            raise KilnError(f"mmap_threshold must be >= 0 bytes (0: glibc's defaults), got {self.mmap_threshold}")
        if self.microbatches < 0:
            raise KilnError(f"--microbatches must be >= 0, got {self.microbatches}")
        if self.stages_per_rank < 1:
            raise KilnError(f"--stages-per-rank must be >= 1, got {self.stages_per_rank}")
        if self.schedule.looped and self.stages_per_rank < 2:
            object.__setattr__(self, "stages_per_rank", 2)
        if not self.schedule.looped and self.stages_per_rank != 1:
            raise KilnError(f"schedule {self.schedule} runs one stage per rank; "
                            f"{', '.join(s for s in PipeSchedule if s.looped)} run several")

    def sizes(self, world: int) -> tuple[int, ...]:
        """The mesh for `world` processes: --mesh as given (its product must be the world), or all
        processes on the one mode."""
        if not self.mesh:
            if len(self.modes) == 2 or self.modes == (Mode.HSDP,):
                raise KilnError(f"--parallel {','.join(self.modes)} needs --mesh, e.g. --mesh 2x{world // 2 or 1}")
            return (world,)
        product = 1
        for n in self.mesh:
            product *= n
        if product != world:
            raise KilnError(f"--mesh {'x'.join(map(str, self.mesh))} is {product} processes but the job has {world} "
                            f"(--nproc x --nnodes)")
        return tuple(self.mesh)

    def degree(self, mode: Mode, world: int) -> int:
        """Processes along `mode`'s mesh dimension (1 if the plan does not use it)."""
        sizes = self.sizes(world)
        if self.modes == (Mode.HSDP,):
            return sizes[0] * sizes[1]
        return dict(zip(self.modes, sizes)).get(mode, 1)

    def data_parallel(self, world: int) -> int:
        """How many ways each global batch is split (the processes that see different samples)."""
        sizes = self.sizes(world)
        if self.modes == (Mode.HSDP,):
            return sizes[0] * sizes[1]
        return next((n for m, n in zip(self.modes, sizes) if m in DATA_MODES), 1)


# glibc's mmap threshold for sharded modes' workers: FSDP gathers each block's weights and frees
# them after use; with glibc's defaults the first freed large buffer raises the (dynamic)
# threshold, later gathers come from the heap, and the heap keeps its high-water mark: the wide
# GPT's rank 1 peaked at 0.87 of one process's memory above the runtime, 0.50 with a fixed
# 128 kB threshold (BENCHMARKS.md, "fsdp ranks without the plain copy"), which returns every
# freed buffer above it to the system (mallopt(3), M_MMAP_THRESHOLD)
SHARDED_MMAP_THRESHOLD = 131072
SHARDED_MODES = (Mode.FSDP, Mode.HSDP)


def allocator_env(parallel: ParallelConfig, environ: dict[str, str]) -> dict[str, str]:
    """The environment variables kiln adds for the workers: MALLOC_MMAP_THRESHOLD_ for sharded
    modes (SHARDED_MMAP_THRESHOLD, or `parallel.mmap_threshold`; 0: none, glibc's defaults),
    never over a value the caller's environment already sets."""
    if "MALLOC_MMAP_THRESHOLD_" in environ:
        return {}
    chosen = parallel.mmap_threshold
    if chosen is None:
        chosen = SHARDED_MMAP_THRESHOLD if any(m in SHARDED_MODES for m in parallel.modes) else 0
    return {"MALLOC_MMAP_THRESHOLD_": str(chosen)} if chosen else {}


def parse_modes(text: str) -> tuple[Mode, ...]:
    """`fsdp,tp` -> (Mode.FSDP, Mode.TP); an unknown name lists the accepted ones."""
    out = []
    for part in text.split(","):
        try:
            out.append(Mode(part.strip()))
        except ValueError:
            raise KilnError(f"--parallel: unknown mode {part.strip()!r}; accepted: "
                            f"{', '.join(m.value for m in Mode)} and the pairs "
                            f"{', '.join(f'{a},{b}' for a, b in sorted(PAIRS))}") from None
    return tuple(out)


def parse_mesh(text: str) -> tuple[int, ...]:
    """`2x2` -> (2, 2)."""
    try:
        sizes = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise KilnError(f"--mesh {text!r}: sizes joined by x, e.g. 2x2") from None
    if any(n < 1 for n in sizes):
        raise KilnError(f"--mesh sizes must be >= 1, got {text}")
    return sizes

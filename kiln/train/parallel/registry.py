"""The registry of parallel modes and the context each engine is built from.

`make_engine(config)` runs inside a torchrun rank: it builds the DeviceMesh the config asks
for (one dimension per mode, outermost first), finds this rank's place on it, and gives the
engine registered under the mode (or the pair, "fsdp,tp", "ddp,tp", "ddp,pp") what it needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from kiln.registry import Registry
from kiln.train.parallel.config import Mode, ParallelConfig
from kiln.train.parallel.engine import Where, full

MODES: Registry[Callable[["Context"], Any]] = Registry(
    "parallel mode", plugins=("kiln.train.parallel.data", "kiln.train.parallel.tp", "kiln.train.parallel.pp"))


@dataclass
class Context:
    config: ParallelConfig
    where: Where
    mesh: Any = None            # torch.distributed.DeviceMesh over every rank, dims named by mode
    data_group: Any = None      # the process group of ranks that split a batch (None: the world)
    shard_mesh: Any = None      # what fully_shard shards over (1-D, or 2-D for hsdp)
    tp_mesh: Any = None
    pp_group: Any = None
    pp_rank: int = 0
    pp_size: int = 1
    # tensor parallel under fsdp: applied before sharding, and its layout conversions
    fused: set = field(default_factory=set)
    before_shard: Callable = field(default=lambda m: m)
    to_full: Callable = field(default=lambda name, t: full(t))
    to_trained: Callable = field(default=lambda name, t: t)


def _names(config: ParallelConfig) -> tuple[str, ...]:
    if config.modes == (Mode.HSDP,):
        return ("replicate", "shard")
    return tuple(m.value for m in config.modes)


def make_context(config: ParallelConfig) -> Context:
    """The mesh and this rank's place on it (inside an initialised process group)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = config.sizes(world)
    names = _names(config)
    mesh = init_device_mesh("cpu", sizes, mesh_dim_names=names)
    ctx = Context(config, Where(rank, world), mesh)
    coords = {n: mesh.get_local_rank(n) for n in names}
    if config.modes == (Mode.HSDP,):
        ctx.shard_mesh = mesh
        ctx.where = Where(rank, world, rank, world)
        ctx.data_group = dist.group.WORLD
        return ctx
    data = next((m.value for m in config.modes if m in (Mode.DDP, Mode.FSDP, Mode.ZERO1)), None)
    if data is not None:
        ctx.data_group = mesh.get_group(data)
        ctx.shard_mesh = mesh[data]
        ctx.where = Where(rank, world, coords[data], sizes[names.index(data)])
    if Mode.TP in config.modes:
        ctx.tp_mesh = mesh["tp"]
    if Mode.PP in config.modes:
        ctx.pp_group = mesh.get_group("pp")
        ctx.pp_rank, ctx.pp_size = coords["pp"], sizes[names.index("pp")]
    return ctx


def make_engine(config: ParallelConfig):
    """The engine of this rank for `config`."""
    ctx = make_context(config)
    key = ",".join(m.value for m in config.modes)
    if key == "fsdp,tp":
        from kiln.train.parallel.tp import attach   # noqa: kiln-internal plug-in, loaded with the registry
        attach(ctx)
        key = "fsdp"
    return MODES.get(key)(ctx)

"""Data-parallel modes: every rank sees its slice of the global batch.

- ddp: the model replicated, gradients averaged by DistributedDataParallel.
- zero1: the same, with the optimizer states sharded (ZeroRedundancyOptimizer: each rank
  steps the parameters of its partition and broadcasts them; ZeRO stage 1, Rajbhandari et
  al. 2020).
- fsdp: FSDP2 `fully_shard` on each repeated block, then the root: parameters, gradients and
  optimizer states are Shard(0) DTensors. reshard_after_forward=True frees the gathered
  parameters after forward (ZeRO-3); False keeps them until backward (ZeRO-2-like: one
  all-gather per step instead of two).
- hsdp: fully_shard on a 2-D mesh, replicated across the first dimension, sharded across the
  second.
Batch norms see the global batch (syncbn.GlobalBatchNorm), so N ranks step as one process.
"""
from __future__ import annotations

import copy
import inspect

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from kiln.train import tasks
from kiln.train.optimizers import build_optimizer
from kiln.train.parallel import syncbn
from kiln.train.parallel.blocks import checkpoint_blocks, repeated_blocks
from kiln.train.parallel.engine import Engine, ShardedEngine
from kiln.train.parallel.registry import MODES, Context


def _trainable(model: nn.Module, ctx: Context) -> nn.Module:
    """LossForward for models with their own loss; batch norm over the global batch."""
    if ctx.where.data_world > 1:
        syncbn.convert(model, ctx.data_group)
    return tasks.LossForward(model) if hasattr(model, "loss") else model


class DDPEngine(Engine):
    levels = 1

    def __init__(self, ctx: Context):
        super().__init__(ctx.where)
        self.ctx, self.data_group = ctx, ctx.data_group

    def prepare(self, model, cfg):
        if self.ctx.config.checkpoint_activations:
            checkpoint_blocks(model)
        opt = build_optimizer(cfg, model)
        return DDP(_trainable(model, self.ctx), process_group=self.ctx.data_group), opt


class Zero1Engine(ShardedEngine):
    levels = 1
    disjoint = True

    def __init__(self, ctx: Context):
        super().__init__(ctx.where)
        self.ctx, self.data_group = ctx, ctx.data_group

    def prepare(self, model, cfg):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        if self.ctx.config.checkpoint_activations:
            checkpoint_blocks(model)
        train = DDP(_trainable(model, self.ctx), process_group=self.ctx.data_group)
        proto = build_optimizer(cfg, model)   # the registry's optimizer, its class and settings
        accepted = inspect.signature(type(proto)).parameters
        kwargs = {k: v for k, v in proto.defaults.items() if k in accepted}
        params = [p for p in model.parameters() if p.requires_grad]
        return train, ZeroRedundancyOptimizer(params, optimizer_class=type(proto), process_group=self.ctx.data_group,
                                              **kwargs)

    def sync(self, model, train_model) -> None:
        """The plain model's parameters are the trained ones (ZeRO broadcasts each step)."""


class FSDPEngine(ShardedEngine):
    def __init__(self, ctx: Context):
        super().__init__(ctx.where)
        self.ctx, self.data_group = ctx, ctx.data_group

    def prepare(self, model, cfg):
        from torch.distributed.fsdp import fully_shard

        work = copy.deepcopy(model)
        self.levels = 1 if hasattr(model, "loss") else 0
        self.fused = self.ctx.fused
        if self.ctx.config.checkpoint_activations:
            checkpoint_blocks(work)
        train = _trainable(work, self.ctx)
        train = self.ctx.before_shard(train)    # tensor parallel first, when the plan is fsdp x tp
        reshard = self.ctx.config.reshard_after_forward
        for _, block in repeated_blocks(train):
            fully_shard(block, mesh=self.ctx.shard_mesh, reshard_after_forward=reshard)
        fully_shard(train, mesh=self.ctx.shard_mesh, reshard_after_forward=reshard)
        return train, build_optimizer(cfg, train)

    def to_full(self, name, t):
        return self.ctx.to_full(name, t)

    def to_trained(self, name, value, like):
        return super().to_trained(name, self.ctx.to_trained(name, value), like)


MODES.register("ddp")(DDPEngine)
MODES.register("zero1")(Zero1Engine)
MODES.register("fsdp")(FSDPEngine)
MODES.register("hsdp")(FSDPEngine)

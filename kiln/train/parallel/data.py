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

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from kiln.train import tasks
from kiln.train.optimizers import build_optimizer
from kiln.train.parallel import syncbn
from kiln.train.parallel.blocks import checkpoint_blocks, repeated_blocks
from kiln.train.parallel.engine import Engine, ShardedEngine, full
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
    """Every rank holds its shards; only rank 0 (which writes the run) also keeps the plain
    model, which `sync` fills one gathered tensor at a time (the others gather each tensor, a
    collective, and drop it). The other ranks shard the model they built in place, so they never
    hold the full model states after `prepare`; evaluation runs on the shards through FSDP's own
    forward on every rank."""

    def __init__(self, ctx: Context):
        super().__init__(ctx.where)
        self.ctx, self.data_group = ctx, ctx.data_group

    def prepare(self, model, cfg):
        from torch.distributed.fsdp import fully_shard

        # a model scored by forward outputs while it trains by its own loss (an early-exit
        # classifier) cannot be evaluated through the loss-forward root: it keeps the plain copy
        self.sharded_eval = not getattr(model, "metric_from_forward", False)
        self.keeps_plain = self.where.rank == 0 or not self.sharded_eval
        work = copy.deepcopy(model) if self.keeps_plain else model
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

    def eval_model(self, model, train_model):
        if not self.sharded_eval:
            return model
        return Evaluated(train_model, own_loss=self.levels == 1, reshard=self.ctx.config.reshard_after_forward,
                         where=self.where, group=self.data_group)

    def sync(self, model, train_model) -> None:
        if self.keeps_plain:
            return super().sync(model, train_model)
        for name, p in self.named(train_model):   # the same collectives as rank 0's, results dropped
            self.to_full(name, p.detach())
        for _, b in train_model.named_buffers():
            full(b)

    def to_full(self, name, t):
        return self.ctx.to_full(name, t)

    def to_trained(self, name, value, like):
        return super().to_trained(name, self.ctx.to_trained(name, value), like)


class Evaluated(nn.Module):
    """The sharded module as `tasks.evaluate` sees a model: its forward (or, for a model with its
    own loss, its `loss`) is FSDP's, which gathers each block's weights in turn. In eval mode every
    block frees its gathered weights after its forward, also when training keeps them for backward
    (ZeRO-2-like) and for the root, so evaluation never holds the whole model.

    A batch given as one tensor is split across the data-parallel ranks (rank r runs rows
    tensor_split(N)[r]) and the outputs all-gathered, so each rank holds 1/N of the evaluation's
    activations; every rank runs the same number of forwards, as FSDP's collectives need."""

    def __init__(self, trained: nn.Module, own_loss: bool, reshard: bool, where=None, group=None):
        super().__init__()
        self.trained, self.reshard, self.where, self.group = trained, reshard, where, group
        if own_loss:
            self.loss = lambda x, y: self.trained(x, y)   # the root is LossForward: its forward is loss

    def forward(self, *args, **kwargs):
        n = self.where.data_world if self.where is not None else 1
        x = args[0] if len(args) == 1 and not kwargs else None
        if n == 1 or not torch.is_tensor(x) or x.shape[0] < n:
            return self.trained(*args, **kwargs)
        out = self.trained(torch.tensor_split(x, n)[self.where.data_rank])
        if not torch.is_tensor(out):   # not logits (a model output object): the whole batch on every rank
            return self.trained(x)
        return _gather_rows(out, [len(c) for c in torch.tensor_split(torch.empty(x.shape[0], 0), n)], self.group)

    def train(self, mode: bool = True):
        from torch.distributed.fsdp import FSDPModule

        for m in self.trained.modules():
            if isinstance(m, FSDPModule):
                # training: as configured, the root keeping its own weights to backward (FSDP's
                # default for the root); evaluating: everything freed after its forward
                m.set_reshard_after_forward(not mode or (self.reshard and m is not self.trained), recurse=False)
        return super().train(mode)


def _gather_rows(part: torch.Tensor, rows: list[int], group) -> torch.Tensor:
    """Each data rank's rows (counts `rows`, in rank order) all-gathered into one tensor."""
    import torch.distributed as dist

    padded = part.new_zeros((max(rows), *part.shape[1:]))
    padded[: part.shape[0]] = part
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:k] for p, k in zip(parts, rows)])


MODES.register("ddp")(DDPEngine)
MODES.register("zero1")(Zero1Engine)
MODES.register("fsdp")(FSDPEngine)
MODES.register("hsdp")(FSDPEngine)

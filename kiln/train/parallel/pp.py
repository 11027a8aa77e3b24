"""Pipeline parallel: the model cut into stages (chain.py), one PipelineStage per stage built by
hand, run by torch.distributed.pipelining's schedules (GPipe, 1F1B, interleaved 1F1B,
zero-bubble) over micro-batches.

Stage s runs on pipeline rank s mod p (p ranks; the looped schedules give each rank several
stages). A parameter used by two stages on different ranks (GPT's embedding, tied to its
output head) has a copy on each; their gradients are summed after every step, as Megatron-LM
does for its tied embeddings, so both copies take the same step. Every rank keeps the plain
model; `sync` broadcasts each parameter from the rank that trains it before an evaluation or a
checkpoint. The schedule averages gradients over micro-batches, so with equal micro-batches a
step equals one process's step on the whole batch.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from kiln.errors import KilnError
from kiln.train.optimizers import build_optimizer
from kiln.train.parallel.blocks import checkpoint_blocks
from kiln.train.parallel.chain import Unit, balance, chain, unit_flops
from kiln.train.parallel.config import ParallelConfig, PipeSchedule
from kiln.train.parallel.engine import ShardedEngine
from kiln.train.parallel.registry import MODES, Context
from kiln.train.parallel.tp import clip_norm


def stage_starts(units: list[Unit], config: ParallelConfig, stages: int, costs: list[int] | None = None) -> list[int]:
    """Index of the unit each stage after the first begins at: the config's `split` names, or
    FLOP-balanced cuts. A name that is no unit, or cuts that leave a stage empty, are errors."""
    names = [u.unit_name for u in units]
    if len(units) < stages:
        raise KilnError(f"pipeline: {stages} stages but the model has only {len(units)} units ({', '.join(names)})")
    if not config.split:
        return balance(costs if costs is not None else [1] * len(units), stages)
    unknown = [s for s in config.split if s not in names]
    if unknown:
        raise KilnError(f"pipeline split at {unknown[0]!r}: no such module; a stage may begin at {', '.join(names[1:])}")
    starts = [names.index(s) for s in config.split]
    if len(starts) != stages - 1:
        raise KilnError(f"pipeline split {','.join(config.split)} makes {len(starts) + 1} stages but the plan has "
                        f"{stages} ({stages - 1} split names needed)")
    if starts != sorted(set(starts)) or starts[0] == 0:
        raise KilnError(f"pipeline split {','.join(config.split)} leaves a stage empty; give distinct names in model "
                        f"order, none of them the first unit {names[0]!r}")
    return starts


def microbatches(config: ParallelConfig, stages: int) -> int:
    return config.microbatches or 2 * stages


def check_pipeline(model: nn.Module, config: ParallelConfig, ranks: int, local_batch: int, example=None,
                   spec: str = "model") -> tuple[str, ...]:
    """Check the plan against the model before any process starts; returns the split names
    (balanced by FLOPs when the config gives none)."""
    units = chain(model)
    stages = ranks * config.stages_per_rank
    costs = unit_flops(model, units, example, spec) if example is not None and not config.split else None
    starts = stage_starts(units, config, stages, costs)
    m = microbatches(config, stages)
    if local_batch % m:
        raise KilnError(f"pipeline: the batch of {local_batch} does not split into {m} equal micro-batches; "
                        f"give a batch size or --microbatches that divides it")
    return tuple(units[i].unit_name for i in starts)


SCHEDULES = {PipeSchedule.GPIPE: "ScheduleGPipe", PipeSchedule.ONE_F_ONE_B: "Schedule1F1B",
             PipeSchedule.INTERLEAVED: "ScheduleInterleaved1F1B", PipeSchedule.ZERO_BUBBLE: "ScheduleInterleavedZeroBubble"}


class _Given:
    """Stands for a model whose output is already computed (the last stage's), for the task loss."""

    def __init__(self, out):
        self.out = out

    def __call__(self, _x):
        return self.out


class PPEngine(ShardedEngine):
    disjoint = True

    def __init__(self, ctx: Context):
        super().__init__(ctx.where)
        self.ctx, self.p, self.r, self.data_group = ctx, ctx.pp_size, ctx.pp_rank, ctx.data_group
        self.busy_s, self.wall_s, self.steps, self._busy = 0.0, 0.0, 0, 0.0

    def _global(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.ctx.pp_group, pp_rank)

    def prepare(self, model, cfg):
        from torch.distributed.pipelining import schedules

        config = self.ctx.config
        units = chain(model)
        self.stages_total = self.p * config.stages_per_rank
        starts = [0, *stage_starts(units, config, self.stages_total), len(units)]
        groups = [units[a:b] for a, b in zip(starts, starts[1:])]
        mine = [s for s in range(self.stages_total) if s % self.p == self.r]
        modules = {s: nn.Sequential(*groups[s]) for s in mine}
        if config.checkpoint_activations:
            for m in modules.values():
                checkpoint_blocks(m)
        self.names = {id(p): n for n, p in model.named_parameters()} | {id(b): n for n, b in model.named_buffers()}
        self._holders(groups)
        self.wrapped, self.groups, self.mine = {s: self._data_parallel(m) for s, m in modules.items()}, groups, mine
        self.first, self.last = 0 in mine, self.stages_total - 1 in mine
        self.loss_fn = None
        m = microbatches(config, self.stages_total)
        cls = getattr(schedules, SCHEDULES[config.schedule])
        self.schedule_args = (cls, m)
        train = nn.ModuleList(modules[s] for s in mine)
        self.stage_modules = list(train)
        return train, build_optimizer(cfg, train)

    def _build_stages(self, x, m: int) -> None:
        """The PipelineStages, with each stage's input and output given (static metadata): the
        runtime inference would run an extra training-mode forward, and batch norm would count
        it in its running statistics. Every rank holds the whole plain model, so each runs the
        units once on a micro-batch, in eval mode without gradients."""
        from torch.distributed.pipelining import PipelineStage

        shapes, h = [], x[: x.shape[0] // m]
        modes = [u.training for g in self.groups for u in g]
        with torch.no_grad():
            for group in self.groups:
                for u in group:
                    u.eval()
                inp = h
                for u in group:
                    h = u(h)
                # activations between stages carry gradients back; the data does not
                grad = lambda t: t.detach().requires_grad_(t.is_floating_point())   # noqa: E731
                shapes.append((inp if not shapes else grad(inp), grad(h)))
        for u, mode in zip([u for g in self.groups for u in g], modes):
            u.train(mode)
        self.stages = [PipelineStage(self.wrapped[s], s, self.stages_total, torch.device("cpu"), input_args=shapes[s][0],
                                     output_args=shapes[s][1], group=self.ctx.pp_group) for s in self.mine]
        for stage in self.stages:
            self._time(stage)

    def _data_parallel(self, module: nn.Module) -> nn.Module:
        if self.ctx.data_group is None or self.where.data_world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, process_group=self.ctx.data_group)

    def _holders(self, groups: list[list[Unit]]) -> None:
        """For each parameter and buffer: the pipeline ranks whose stages hold it; a subgroup for
        each parameter held on several ranks (tied weights), made on every rank in the same order."""
        holders: dict[str, list[int]] = {}
        for s, group in enumerate(groups):
            for u in group:
                for t in [*u.parameters(), *u.buffers()]:
                    ranks = holders.setdefault(self.names[id(t)], [])
                    if s % self.p not in ranks:
                        ranks.append(s % self.p)
        self.holders = holders
        self.tied = {}
        rows = self.ctx.mesh.mesh.reshape(-1, self.p).tolist()   # one row of global ranks per pipeline
        params = {self.names[id(p)] for g in groups for u in g for p in u.parameters()}
        for name, ranks in sorted(holders.items()):
            # a buffer on several stages (a decoder's rotary frequencies) is not trained: no group
            if len(ranks) > 1 and name in params:
                for row in rows:
                    group = dist.new_group([row[r] for r in sorted(ranks)])
                    if dist.get_rank() in [row[r] for r in ranks]:
                        self.tied[name] = group

    def _time(self, stage) -> None:
        """Busy time of this rank: its stage's forward and backward chunks."""
        for method in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            real = getattr(stage, method, None)
            if real is None:
                continue

            def timed(*args, _real=real, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _real(*args, **kwargs)
                finally:
                    self._busy += time.perf_counter() - t0

            setattr(stage, method, timed)

    def step(self, train_model, step_loss, x, y) -> torch.Tensor:
        if self.loss_fn is None:   # the task's loss of the last stage's output
            self.loss_fn = lambda out, target: step_loss(_Given(out), None, target)
            cls, m = self.schedule_args
            self._build_stages(x, m)
            stages = self.stages if cls.__name__ in ("ScheduleInterleaved1F1B", "ScheduleInterleavedZeroBubble") \
                else self.stages[0]
            self.schedule = cls(stages, n_microbatches=m, loss_fn=self.loss_fn)
        losses: list = []
        self._busy, t0 = 0.0, time.perf_counter()
        self.schedule.step(*((x,) if self.first else ()), target=y if self.last else None, losses=losses)
        wall = time.perf_counter() - t0
        if self.steps:   # the first step also exchanges shapes: left out
            self.busy_s, self.wall_s = self.busy_s + self._busy, self.wall_s + wall
        self.steps += 1
        for name, group in self.tied.items():
            p = self._param(train_model, name)
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
        loss = torch.stack([l.detach() for l in losses]).mean() if losses else torch.zeros(())
        dist.broadcast(loss, src=self._global((self.stages_total - 1) % self.p), group=self.ctx.pp_group)
        return self.mean_loss(loss)   # across pipelines (ddp,pp)

    def _param(self, train_model, name):
        for p in train_model.parameters():
            if self.names.get(id(p)) == name:
                return p
        raise KeyError(name)

    def named(self, train_model):
        seen, out = set(), []
        for p in train_model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((self.names[id(p)], p))
        return out

    def named_buffers(self, train_model):
        return list({id(b): (self.names[id(b)], b) for b in train_model.buffers()}.values())

    def clip(self, train_model, max_norm: float) -> None:
        clip_norm(self.named(train_model), max_norm, self.ctx.pp_group,
                  counted=lambda name: self.holders[name][0] == self.r)

    def sync(self, model, train_model) -> None:
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if name in self.holders:
                    dist.broadcast(t.data, src=self._global(self.holders[name][0]), group=self.ctx.pp_group)

    @property
    def rank_report(self) -> dict:
        """Bytes, and the measured idle share of the schedule's steps beside the theory's
        bubble (p-1)/(m+p-1) for GPipe and 1F1B (Huang et al. 2019; Narayanan et al. 2021)."""
        m = self.schedule_args[1]
        return {**super().rank_report, "pp_rank": self.r, "busy_s": self.busy_s, "wall_s": self.wall_s,
                "idle_fraction": 1 - self.busy_s / self.wall_s if self.wall_s else None,
                "bubble_theory": (self.p - 1) / (m + self.p - 1), "microbatches": m, "stages": self.stages_total,
                "units": [getattr(u, "_checkpoint_wrapped_module", u).unit_name for s in self.stage_modules for u in s]}


MODES.register("pp")(PPEngine)
MODES.register("ddp,pp")(PPEngine)

"""What one rank does in a parallel training step, and how its state becomes a normal run.

The trainer keeps a plain `model` (the run's weights: evaluated, saved as safetensors, what
`kiln eval` reloads) and trains the engine's `train_model` (wrapped, sharded or split). An
engine answers the questions the trainer asks: build the trained module and its optimizer,
run forward and backward of one step, copy the trained weights back into the plain model
(`sync`, collective), name the module to evaluate (`eval_model`), and give or take the
optimizer's full state keyed by parameter name (collective, so a run saved by N processes
resumes in M, 1 included). Under fsdp only rank 0, which writes the run, keeps a plain model
(`keeps_plain`); the other ranks hold only their shards and evaluate through FSDP.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from kiln.train import tasks
from kiln.train.parallel.checkpoint import save_sharded
from kiln.train.optimizers import build_optimizer

# wrappers that add a level to parameter names: DDP, LossForward, checkpoint_wrapper, compile
WRAPPER_PREFIXES = ("module.", "model.", "_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str, wrapped_levels: int = 0) -> str:
    """The plain model's name of a parameter of a wrapped module: `wrapped_levels` leading
    wrapper prefixes dropped, checkpoint wrappers dropped anywhere."""
    name = name.replace("_checkpoint_wrapped_module.", "")
    for _ in range(wrapped_levels):
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
    return name


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered (collective), a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass(frozen=True)
class Where:
    """This process in the job: its global rank, the world, and its place along the data
    dimension (processes with the same data rank see the same samples)."""
    rank: int = 0
    world: int = 1
    data_rank: int = 0
    data_world: int = 1


class Engine:
    """Single process, or any wrapper that keeps the plain model's parameters (DDP)."""

    levels = 0   # wrapper prefixes on the trained module's parameter names

    def __init__(self, where: Where = Where(), wrap: Callable[[nn.Module], nn.Module] = lambda m: m):
        self.where, self.wrap = where, wrap

    # --- building -------------------------------------------------------------------------
    def prepare(self, model: nn.Module, cfg) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The module to train and its optimizer."""
        opt = build_optimizer(cfg, model)
        return self.wrap(tasks.LossForward(model) if hasattr(model, "loss") else model), opt

    # --- one step -------------------------------------------------------------------------
    def step(self, train_model: nn.Module, step_loss, x, y) -> torch.Tensor:
        """Forward and backward of one batch (gradients left in the parameters); the loss."""
        loss = step_loss(train_model, x, y)
        loss.backward()
        return self.mean_loss(loss)

    data_group = None   # the data-parallel process group (None: the world)

    def mean_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The global batch's loss (the mean of the data-parallel ranks' equal slices), so the
        logged curve is one process's."""
        if self.where.data_world == 1 or not dist.is_initialized():
            return loss
        total = loss.detach().clone()
        dist.all_reduce(total, group=self.data_group)
        return total / self.where.data_world

    def clip(self, train_model: nn.Module, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(train_model.parameters(), max_norm)

    # --- state ----------------------------------------------------------------------------
    keeps_plain = True   # this rank's plain model holds the weights (False: an fsdp rank other than 0)

    def eval_model(self, model: nn.Module, train_model: nn.Module) -> nn.Module:
        """What the trainer evaluates after `sync`: the plain model, unless the engine evaluates
        its trained module itself (fsdp: the shards, through FSDP's forward; collective)."""
        return model

    def sync(self, model: nn.Module, train_model: nn.Module) -> None:
        """Make the plain model hold the trained weights (nothing to do when they are shared)."""

    def optimizer_state(self, opt: torch.optim.Optimizer, train_model: nn.Module) -> dict:
        self.bytes = self.local_bytes(train_model, opt)
        return opt.state_dict()

    def checkpoint(self, run_path, opt: torch.optim.Optimizer, train_model: nn.Module) -> dict:
        """Collective: the full optimizer state for state.pt, and in a parallel run each rank's
        shards written through DCP under rank 0's `run_path` (checkpoint.py)."""
        full_state = self.optimizer_state(opt, train_model)
        if dist.is_initialized():
            save_sharded(self.sharded_state(opt, train_model), run_path)
        return full_state

    def named(self, train_model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """(plain name, trained parameter), one per distinct parameter, the same order on every rank."""
        seen, out = set(), []
        for name, p in train_model.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((plain_name(name, self.levels), p))
        return out

    def named_buffers(self, train_model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [(plain_name(n, self.levels), b) for n, b in train_model.named_buffers()]

    def dcp_tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A tensor as DCP saves it: its shard as it lies, unless its layout is not the plain
        model's (tensor parallel's fused QKV: saved whole)."""
        return t

    def sharded_state(self, opt, train_model: nn.Module) -> dict:
        """Weights, buffers and optimizer states keyed by plain names: what DCP saves."""
        model = {n: self.dcp_tensor(n, p.detach()) for n, p in self.named(train_model)}
        model |= dict(self.named_buffers(train_model))
        states = opt_state(opt)
        optim = {f"{n}.{k}": self.dcp_tensor(n, v) if v.dim() else v
                 for n, p in self.named(train_model) if p in states
                 for k, v in states[p].items() if torch.is_tensor(v)}
        return {"model": model, "optim": optim}

    bytes: dict = {}
    _describe: dict | None = None

    @property
    def rank_report(self) -> dict:
        """What this rank measured: its bytes of model states at the last checkpoint, and its
        process's peak resident memory (getrusage: kilobytes on Linux)."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"rank": self.where.rank, **{f"{k}_bytes": v for k, v in self.bytes.items()}, "peak_rss_bytes": peak}

    @property
    def describe(self) -> dict | None:
        """The plan and every rank's report, for metrics.json (collective: every rank calls it)."""
        if self._describe is None:
            return None
        parts = [self.rank_report]
        if dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.rank_report)
        return {**self._describe, "ranks": parts}

    @describe.setter
    def describe(self, value: dict) -> None:
        self._describe = value

    def load_optimizer_state(self, opt: torch.optim.Optimizer, train_model: nn.Module, state: dict, model: nn.Module) -> None:
        if "by_name" in state:   # saved by a parallel run: back to positions
            state = by_position(state, [n for n, p in model.named_parameters() if p.requires_grad])
        opt.load_state_dict(state)

    def local_bytes(self, train_model: nn.Module, opt: torch.optim.Optimizer) -> dict:
        """Bytes of this rank's parameters, gradients and optimizer states (its shards only)."""
        params = {id(p): p for p in train_model.parameters()}.values()
        size = lambda t: local(t).numel() * local(t).element_size()   # noqa: E731
        states = [v for p in opt_params(opt) for v in opt_state(opt).get(p, {}).values() if torch.is_tensor(v)]
        return {"params": sum(size(p) for p in params),
                "grads": sum(size(p.grad) for p in params if p.grad is not None),
                "optimizer": sum(size(v) for v in states)}


def opt_params(opt) -> list:
    return [p for g in opt.param_groups for p in g["params"]]


def opt_state(opt) -> dict:
    """param -> state of the optimizer this rank steps (ZeroRedundancyOptimizer keeps its
    shard's states in an inner optimizer)."""
    inner = getattr(opt, "optim", None)
    return inner.state if inner is not None else opt.state


def by_position(named: dict, names: list[str]) -> dict:
    """A name-keyed optimizer state -> torch's positional `state_dict` over `names`."""
    where = {n: i for i, n in enumerate(names)}
    return {"state": {where[n]: s for n, s in named["by_name"].items() if n in where},
            "param_groups": [{**named["group"], "params": list(range(len(names)))}]}


def by_name(positional: dict, names: list[str]) -> dict:
    """torch's positional optimizer `state_dict` (one group) -> keyed by parameter name."""
    group = {k: v for k, v in positional["param_groups"][0].items() if k != "params"}
    return {"by_name": {names[i]: s for i, s in positional["state"].items()}, "group": group}


class ShardedEngine(Engine):
    """Base of engines whose trained module has its own (sharded or split) parameters: the
    optimizer state travels keyed by the plain model's parameter names, gathered in full."""

    disjoint = False   # True: each rank holds states of only some parameters (ZeRO-1, pipeline)

    def to_full(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A trained tensor in the plain model's layout (tensor parallel permutes fused QKV)."""
        return full(t)

    fused: set | frozenset = frozenset()   # plain names whose trained layout differs (tensor parallel's QKV)

    def dcp_tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.to_full(name, t) if name in self.fused else t

    def to_trained(self, name: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A plain-layout tensor in the trained parameter's layout (its shard)."""
        if hasattr(like, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(value.to(like.dtype), like.device_mesh, like.placements)
        return value

    def sync(self, model: nn.Module, train_model: nn.Module) -> None:
        plain = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in self.named(train_model):
                plain[name].copy_(self.to_full(name, p.detach()))
            buffers = dict(model.named_buffers())
            for name, b in train_model.named_buffers():
                key = plain_name(name, self.levels)
                if key in buffers:
                    buffers[key].copy_(full(b))

    def optimizer_state(self, opt, train_model) -> dict:
        self.bytes = self.local_bytes(train_model, opt)
        states = opt_state(opt)
        # only rank 0 writes state.pt: the others gather each tensor (a collective) and drop it,
        # so their peak holds one full tensor at a time, not the whole state
        keep = not dist.is_initialized() or dist.get_rank() == 0 or self.disjoint
        mine = {}
        for name, p in self.named(train_model):
            if p in states:
                entry = {k: self.to_full(name, v) if torch.is_tensor(v) and v.dim() else full(v)
                         for k, v in states[p].items()}
                if keep:
                    mine[name] = entry
        if self.disjoint and dist.is_initialized():
            parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(mine, parts, dst=0)
            mine = {k: v for part in parts for k, v in part.items()} if parts else {}
        group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        return {"by_name": mine, "group": group}

    def load_optimizer_state(self, opt, train_model, state: dict, model: nn.Module) -> None:
        if "by_name" not in state:   # saved by one process: positions of the plain model's parameters
            state = by_name(state, [n for n, p in model.named_parameters() if p.requires_grad])
        named = {id(p): (n, p) for n, p in self.named(train_model)}
        params = opt_params(opt)
        positional = {}
        for i, p in enumerate(params):
            name, _ = named[id(p)]
            if name in state["by_name"]:
                positional[i] = {k: self.to_trained(name, v, p) if torch.is_tensor(v) and v.dim() else v
                                 for k, v in state["by_name"][name].items()}
        groups = [{**state["group"], "params": list(range(len(params)))}]
        opt.load_state_dict({"state": positional, "param_groups": groups})

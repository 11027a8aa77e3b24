"""Tensor parallel: DTensor `parallelize_module` with the column/row-wise plan kiln derives from
the model's blocks (Megatron-LM's split, Shoeybi et al. 2019: the first linear of attention and
of the MLP column-wise, the second row-wise, so each block needs one all-reduce forward and one
backward).

Plans are derived for the zoo's transformer block (GPT, ViT: one fused QKV projection),
transformers' BERT layers (MiniLM: query/key/value) and Llama-style decoders (q/k/v/o_proj,
gate/up/down_proj). Norms, embeddings and heads stay replicated (every rank computes them on
the full activations, so their gradients agree without communication); with
`sequence_parallel` the zoo block's norms and residual stream are sharded along the sequence
(SequenceParallel), gathered before attention and the MLP.

A fused QKV weight (3d x d) is sharded by heads: rank r holds the rows of its heads' q, k and v
([q_r; k_r; v_r]), which is not a contiguous slice of the plain weight, so the trained DTensor
holds the rows interleaved by rank; `to_full` and `to_trained` convert, so checkpoints and the
plain model keep the plain layout.

ddp,tp (dp x tp on a 2-D mesh): each row of the mesh is a tensor-parallel group, the rows are
replicas that see different slices of the batch; after backward each rank's gradient shards
are averaged over its column (the data-parallel group, one all-reduce per tensor), so the
replicas take the same step, as DDP would.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.models.zoo.layers import Block
from kiln.train.optimizers import build_optimizer
from kiln.train.parallel.blocks import checkpoint_blocks
from kiln.train.parallel.engine import ShardedEngine, full, local
from kiln.train.parallel.registry import MODES, Context


def interleave(t: torch.Tensor, n: int) -> torch.Tensor:
    """Plain fused QKV rows [q; k; v] -> [q_0; k_0; v_0; q_1; ...] (rank r's heads together)."""
    rest = t.shape[1:]
    return t.reshape(3, n, t.shape[0] // (3 * n), *rest).transpose(0, 1).reshape(t.shape)


def deinterleave(t: torch.Tensor, n: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(n, 3, t.shape[0] // (3 * n), *rest).transpose(0, 1).reshape(t.shape)


def _attention_sizes(module: nn.Module) -> tuple[str, int, int, int] | None:
    """(kind, heads, kv heads, width) of a block kiln knows how to split, else None."""
    if isinstance(module, Block):
        return "zoo", module.attn.heads, module.attn.heads, module.attn.qkv.in_features
    cls = type(module).__name__
    if cls.endswith("DecoderLayer") and hasattr(module, "self_attn") and hasattr(module, "mlp") \
            and hasattr(module.self_attn, "q_proj") and hasattr(module.mlp, "gate_proj"):
        cfg = module.self_attn.config
        return "llama", cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    if cls.endswith("Layer") and hasattr(module, "attention") and hasattr(module, "intermediate") \
            and hasattr(getattr(module.attention, "self", None), "query"):
        attn = module.attention.self
        return "bert", attn.num_attention_heads, attn.num_attention_heads, attn.query.in_features
    return None


def tp_blocks(model: nn.Module) -> list[tuple[str, nn.Module, tuple]]:
    return [(name, m, sizes) for name, m in model.named_modules() if (sizes := _attention_sizes(m))]


def check_tensor_parallel(model: nn.Module, degree: int) -> None:
    """The plan must exist and the degree must divide every head count and width it splits."""
    blocks = tp_blocks(model)
    if not blocks:
        raise KilnError(f"tensor parallel: no block kiln can split in {type(model).__name__}; plans exist for "
                        f"the zoo's transformer blocks (zoo:gpt, zoo:vit_tiny), BERT layers and Llama-style decoders")
    for name, module, (kind, heads, kv, width) in blocks:
        hidden = _mlp_hidden(kind, module)
        for what, n in (("attention heads", heads), ("key/value heads", kv), ("hidden size", width),
                        ("MLP width", hidden)):
            if n % degree:
                raise KilnError(f"tensor parallel degree {degree} does not divide the {what} ({n}) of {name}; "
                                f"accepted degrees divide {heads} heads, {kv} key/value heads, width {width} "
                                f"and MLP width {hidden}")


def _mlp_hidden(kind: str, m: nn.Module) -> int:
    return {"zoo": lambda: m.mlp[0].out_features, "llama": lambda: m.mlp.gate_proj.out_features,
            "bert": lambda: m.intermediate.dense.out_features}[kind]()


class TensorPlan:
    """The plan for one model on a 1-D tensor-parallel mesh, and its layout conversions."""

    def __init__(self, mesh, sequence_parallel: bool = False):
        self.mesh, self.sp, self.fused = mesh, sequence_parallel, set()
        self.n = mesh.size()

    def apply(self, model: nn.Module) -> nn.Module:
        from torch.distributed.tensor.parallel import parallelize_module

        check_tensor_parallel(model, self.n)
        for name, module, (kind, *_rest) in tp_blocks(model):
            prefix = f"{name}.".replace("_checkpoint_wrapped_module.", "") if name else ""
            parallelize_module(module, self.mesh, self._plan(kind, module, prefix))
            if kind == "zoo" and self.sp:
                parallelize_module(module, self.mesh, _block_io())
        return model

    def _plan(self, kind: str, module: nn.Module, prefix: str) -> dict:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                       SequenceParallel)

        if kind == "llama":
            return {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                    "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
                    "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                    "mlp.down_proj": RowwiseParallel()}
        if kind == "bert":
            return {"attention.self.query": ColwiseParallel(), "attention.self.key": ColwiseParallel(),
                    "attention.self.value": ColwiseParallel(), "attention.output.dense": RowwiseParallel(),
                    "intermediate.dense": ColwiseParallel(), "output.dense": RowwiseParallel()}
        # the zoo block: heads split by rank, the fused QKV weight interleaved (module docstring)
        n = self.n
        with torch.no_grad():
            for p in module.attn.qkv.parameters():
                p.copy_(interleave(p, n))
        self.fused |= {prefix + "attn.qkv.weight", prefix + "attn.qkv.bias"}
        module.attn.heads //= n
        plan = {"attn.qkv": ColwiseParallel(), "mlp.0": ColwiseParallel()}
        if not self.sp:
            return plan | {"attn.proj": RowwiseParallel(), "mlp.2": RowwiseParallel()}
        seq = Shard(1)
        return plan | {
            "ln1": SequenceParallel(), "ln2": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            "attn.proj": RowwiseParallel(output_layouts=seq, use_local_output=False),
            "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            "mlp.2": RowwiseParallel(output_layouts=seq, use_local_output=False),
        }

    def _key(self, name: str) -> str:
        return name.replace("_checkpoint_wrapped_module.", "")

    def to_full(self, name: str, t: torch.Tensor) -> torch.Tensor:
        t = full(t)
        return deinterleave(t, self.n) if self._key(name) in self.fused and t.dim() else t

    def to_trained(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return interleave(value, self.n) if self._key(name) in self.fused and value.dim() else value


def _block_io():
    """The block's input sharded along the sequence as it enters, gathered as it leaves."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ParallelStyle
    from torch.distributed.tensor.parallel import PrepareModuleInput as prepare_in
    from torch.distributed.tensor.parallel import PrepareModuleOutput as prepare_out

    seq, rep = Shard(1), Replicate()

    class BlockIO(ParallelStyle):
        def _apply(self, module, mesh):
            prepare_in(input_layouts=(rep,), desired_input_layouts=(seq,), use_local_output=False)._apply(module, mesh)
            prepare_out(output_layouts=(seq,), desired_output_layouts=(rep,), use_local_output=True)._apply(module, mesh)
            return module

    return BlockIO()


class TPEngine(ShardedEngine):
    def __init__(self, ctx: Context):
        super().__init__(ctx.where)
        self.ctx, self.data_group = ctx, ctx.data_group
        self.plan = TensorPlan(ctx.tp_mesh, ctx.config.sequence_parallel)
        self.fused = self.plan.fused

    def prepare(self, model, cfg):
        work = copy.deepcopy(model)
        self.plan.apply(work)
        if self.ctx.config.checkpoint_activations:
            checkpoint_blocks(work)
        return work, build_optimizer(cfg, work)

    def step(self, train_model, step_loss, x, y) -> torch.Tensor:
        loss = super().step(train_model, step_loss, x, y)
        if self.where.data_world > 1:   # ddp,tp: the replicas' gradient shards averaged
            import torch.distributed as dist

            with torch.no_grad():
                for _, p in self.named(train_model):
                    if p.grad is not None:
                        g = local(p.grad)
                        dist.all_reduce(g, group=self.data_group)
                        g.div_(self.where.data_world)
        return loss

    def to_full(self, name, t):
        return self.plan.to_full(name, t)

    def to_trained(self, name, value, like):
        return super().to_trained(name, self.plan.to_trained(name, value), like)

    def clip(self, train_model, max_norm: float) -> None:
        clip_norm(self.named(train_model), max_norm)


def clip_norm(named, max_norm: float, group=None, counted=lambda name: True) -> None:
    """torch's clip_grad_norm_ over gradients that may be DTensor shards, plain replicas, or
    (with `group`) held by different ranks: the global L2 norm, then one common scale."""
    import torch.distributed as dist

    grads = [(n, p.grad) for n, p in named if p.grad is not None]
    total = torch.zeros(())
    for name, g in grads:
        if counted(name):
            total += full(torch.linalg.vector_norm(g)).float() ** 2
    if group is not None:
        dist.all_reduce(total, group=group)
    coef = torch.clamp(max_norm / (total.sqrt() + 1e-6), max=1.0)
    for _, g in grads:
        g.mul_(coef)


def attach(ctx: Context) -> None:
    """fsdp x tp: the tensor-parallel plan applied before FSDP shards along the data dimension."""
    plan = TensorPlan(ctx.tp_mesh, ctx.config.sequence_parallel)
    ctx.fused = plan.fused
    ctx.before_shard = plan.apply
    ctx.to_full = plan.to_full
    ctx.to_trained = plan.to_trained


MODES.register("tp")(TPEngine)
MODES.register("ddp,tp")(TPEngine)

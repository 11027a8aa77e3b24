"""Capture a whole training step (forward, loss, backward, optimizer update) as one graph.

The step is traced with make_fx, the tracer aot_autograd builds its joint graph with: the
function runs forward, loss, `torch.autograd.grad` and the optimizer's own `step()` on traced
tensors, so the graph holds the ATen ops autograd really runs in the backward (activation
checkpointing's recomputation included) and the optimizer's real update. torch.export's
`_export_forward_backward` gives the same joint program but drops every node's module
(nn_module_stack comes back empty), so kiln traces itself and tags each op as it is recorded:
its phase (forward, backward, recompute, optimizer) and the module it belongs to (in the
backward, the module whose forward created the autograd node that runs).

The optimizer is traced in its steady state: its states (Adam's moments and step counter)
are graph inputs shaped as the real optimizer makes them, not zeros created inside the step.
"""
from __future__ import annotations

import contextlib
import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, get_innermost_proxy_mode, make_fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.checkpoint import checkpoint

from kiln.errors import KilnError, first_line
from kiln.graph.graph import Graph


class Phase(enum.Enum):
    FORWARD = "forward"        # the model's forward and the loss
    BACKWARD = "backward"      # autograd's backward ops
    RECOMPUTE = "recompute"    # forward ops re-run in the backward by activation checkpointing
    OPTIMIZER = "optimizer"    # the update (and, in mixed precision, the casts to and from master)


class Precision(enum.Enum):
    FP32 = "fp32"
    # Mixed precision as ZeRO (arXiv 1910.02054, section 3.1) and Megatron count it: the model's
    # weights and gradients in bf16, the optimizer keeps fp32 master weights beside its states.
    BF16 = "bf16"


class InputKind(enum.Enum):
    WEIGHT = "weights"
    BUFFER = "buffers"
    STATE = "optimizer_states"
    BATCH = "inputs"


@dataclass(frozen=True)
class OpTag:
    phase: Phase
    module: str          # FQN in the model ("" for the root, the loss and the optimizer)


@dataclass
class StepGraph:
    """A training step's graph: kiln's Graph of it, each op's tag, each input's kind, and which
    node holds each parameter's final gradient."""

    graph: Graph
    tags: dict[str, OpTag]
    input_kinds: dict[str, InputKind]
    gradients: dict[str, str]            # parameter FQN -> node holding its gradient
    optimizer: str
    precision: Precision
    checkpointed: tuple[str, ...] = ()
    model_params: dict[str, int] = field(default_factory=dict)   # FQN -> numel
    counter_bytes: int = 0               # the optimizer's 0-d states (step counters), kept out of the graph


def default_loss(output: Any) -> torch.Tensor:
    """A stand-in loss touching every element of the model's main output: mean of squares.

    Which loss hardly matters to a step's cost: a loss is elementwise work and a reduction
    (0 FLOPs in flop_counter's convention) on one tensor; the backward through the model is
    the same for any loss whose gradient reaches every output element."""
    out = output.logits if hasattr(output, "logits") else output
    if isinstance(out, dict):
        out = next(iter(out.values()))
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out.float().pow(2).mean()


@dataclass(frozen=True)
class _SignatureShim:
    """What kiln's Graph reads from an ExportedProgram's signature."""

    inputs_to_parameters: dict[str, str]
    inputs_to_buffers: dict[str, str]
    inputs_to_lifted_tensor_constants: dict[str, str]


@dataclass(frozen=True)
class _TracedProgram:
    """A make_fx GraphModule in the shape kiln's Graph reads (graph, graph_module, signature)."""

    graph_module: torch.fx.GraphModule
    graph_signature: _SignatureShim

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    def module(self) -> torch.fx.GraphModule:
        return self.graph_module


class _Tagger(TorchDispatchMode):
    """Tags each node make_fx records with the phase and module current when it was made."""

    def __init__(self):
        super().__init__()
        self.tags: dict[str, OpTag] = {}
        self.phase = Phase.FORWARD
        self.stack: list[str] = []                 # FQNs of the module forwards running
        self.by_seq: dict[int, str] = {}           # autograd node sequence nr -> forward module
        self.untraced: set[int] = set()            # ids of the optimizer's step counters

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if (tensors and all(id(t) in self.untraced for t in tensors)) or func is torch.ops.aten._local_scalar_dense.default:
            # a step counter, counted and read with .item() by the optimizer, is kept out of the
            # graph; a data-dependent scalar (a mask check's .item()) is read from the example
            # batch, so the graph is specialised to it, as torch.export specialises on its input
            with disable_proxy_modes_tracing(), unset_fake_temporarily():
                return func(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        phase, module = self.phase, self.stack[-1] if self.stack else ""
        if phase is Phase.BACKWARD:
            if self.stack:
                phase = Phase.RECOMPUTE       # a module's forward running inside the backward
            else:
                node = torch._C._current_autograd_node()
                module = self.by_seq.get(node._sequence_nr(), "") if node is not None else ""
        graph = get_innermost_proxy_mode().tracer.graph
        for n in reversed(graph.nodes):
            if n.op != "call_function" or n.name in self.tags:
                break
            self.tags[n.name] = OpTag(phase, module)
        if phase is Phase.FORWARD and self.stack:
            # below autograd, the op's grad_fn is already made: it took the last sequence number
            self.by_seq.setdefault(torch.autograd._get_sequence_nr() - 1, module)
        return out


def _module_hooks(model: torch.nn.Module, tagger: _Tagger) -> list:
    names = {id(m): name for name, m in model.named_modules()}

    def pre(mod, args):
        if id(mod) in names:
            tagger.stack.append(names[id(mod)])

    def post(mod, args, out):
        if id(mod) in names and tagger.stack:
            tagger.stack.pop()

    return [torch.nn.modules.module.register_module_forward_pre_hook(pre),
            torch.nn.modules.module.register_module_forward_hook(post, always_call=True)]


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """A torch.optim optimizer by its lower-case name (adamw, adam, sgd, rmsprop, adagrad...)."""
    classes = {c.lower(): getattr(torch.optim, c) for c in dir(torch.optim)
               if isinstance(getattr(torch.optim, c), type) and issubclass(getattr(torch.optim, c), torch.optim.Optimizer)
               and c not in ("Optimizer", "LBFGS", "SparseAdam")}
    if name.lower() not in classes:
        raise KilnError(f"optimizer {name!r}: expected one of {', '.join(sorted(classes))}")
    return classes[name.lower()]


def make_optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer as kiln's step runs it: single-tensor code path (foreach=False), so the
    traced update and a measured eager step execute the same ops; SGD with momentum 0.9."""
    cls = optimizer_class(name)
    kwargs: dict[str, Any] = {"lr": 1e-3}
    if cls is torch.optim.SGD:
        kwargs["momentum"] = 0.9
    if "foreach" in cls.__init__.__code__.co_varnames:
        kwargs["foreach"] = False
    return cls(params, **kwargs)


def state_layout(name: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The steady-state optimizer state of one parameter, found by one real step on a copy."""
    p = torch.nn.Parameter(param.detach().float().clone())
    opt = make_optimizer(name, [p])
    p.grad = torch.zeros_like(p)
    opt.step()
    return {k: v.detach().clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}


def checkpoint_targets(model: torch.nn.Module) -> tuple[str, ...]:
    """The modules activation checkpointing wraps by default: the blocks of the model's
    outermost repeated stacks (every nn.ModuleList/Sequential of two or more modules that no
    other such stack contains), as Megatron and Hugging Face checkpoint per layer."""
    found: list[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)) and len(mod) >= 2 and name:
            if not any(name.startswith(f + ".") for f in found):
                found.append(name)
    return tuple(f"{stack}.{i}" for stack in found for i in range(len(model.get_submodule(stack))))


def capture_step(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *,
                 loss_fn: Callable[[Any], torch.Tensor] = default_loss, optimizer: str = "adamw",
                 checkpointed: tuple[str, ...] = (), precision: Precision = Precision.FP32,
                 name: str = "step") -> StepGraph:
    """Trace one training step of `model` on `args`/`kwargs` (train mode, the given optimizer,
    the given modules wrapped in torch.utils.checkpoint) into a StepGraph."""
    kwargs = dict(kwargs or {})
    model = model.train()
    dtype = torch.bfloat16 if precision is Precision.BF16 else None
    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    buffers = dict(model.named_buffers())
    layouts = {n: state_layout(optimizer, params[n]) for n in trainable}
    flat_inputs, in_spec = pytree.tree_flatten((args, kwargs))
    values = [_cast(p.detach(), dtype) for p in params.values()] + [_cast(b.detach(), dtype) for b in buffers.values()]
    # 0-d states (step counters) stay real tensors, constants of the trace: the non-capturable
    # optimizers read them with .item(), which a traced tensor cannot answer
    states = [t for n in trainable for t in layouts[n].values() if t.dim() > 0]
    masters = [params[n].detach().float().clone() for n in trainable] if dtype else []
    kinds = ([InputKind.WEIGHT] * len(params) + [InputKind.BUFFER] * len(buffers)
             + [InputKind.STATE] * (len(states) + len(masters)) + [InputKind.BATCH] * len(flat_inputs))
    tagger = _Tagger()
    names, bnames = list(params), list(buffers)
    result: dict[str, Any] = {}

    def step(flat):
        it = iter(flat)
        p_vals = dict(zip(names, itertools.islice(it, len(names))))
        b_vals = dict(zip(bnames, itertools.islice(it, len(bnames))))
        s_vals = list(itertools.islice(it, len(states)))
        m_vals = list(itertools.islice(it, len(masters)))
        a, kw = pytree.tree_unflatten(list(it), in_spec)
        leaves = [p_vals[n].requires_grad_() for n in trainable]
        # the traced weights stay in the model through the backward: checkpointing's recompute reads them there
        with tagger, checkpointed_forwards(model, checkpointed, tagger.stack), _reparametrize_module(model, {**p_vals, **b_vals}, tie_weights=True):
            with autocast(dtype):
                out = model(*(_cast(x, dtype) for x in a), **{k: _cast(v, dtype) for k, v in kw.items()})
            loss = loss_fn(out)
            tagger.phase = Phase.BACKWARD
            # loss.backward() fills every leaf that requires grad, the ones the model makes too
            # (wav2vec2's feature encoder marks its input so: its first convolution's input
            # gradient runs in a real step); autograd.grad computes only what it is asked for
            others = _other_leaves(loss, leaves)
            grads = torch.autograd.grad(loss, leaves + others, allow_unused=True)[:len(leaves)]
            tagger.phase = Phase.OPTIMIZER
            with torch.no_grad():
                _update(optimizer, trainable, leaves, grads, layouts, s_vals, m_vals, tagger.untraced)
        result["grads"] = grads
        return (loss.detach(), *[g for g in grads if g is not None])

    handles = _module_hooks(model, tagger)
    try:
        flat = values + states + masters + flat_inputs
        # a model without weights (meta device: kiln.models.meta) is traced on fake tensors, as
        # torch.export captures it; transformers then skips its value checks (an all-ones mask,
        # packed sequences) as it does under export, instead of calling .item() on a meta tensor
        fake = any(isinstance(t, torch.Tensor) and t.is_meta for t in flat)
        gm = make_fx(step, tracing_mode="fake" if fake else "real", _allow_non_fake_inputs=fake)(flat)
    except KilnError:
        raise
    except Exception as exc:   # tracing raises many types; all are the model's construct
        raise KilnError(f"cannot trace a training step of {name}: {type(exc).__name__}: {first_line(exc)}") from None
    finally:
        for h in handles:
            h.remove()
    counters = sum(t.numel() * t.element_size() for n in trainable for t in layouts[n].values() if t.dim() == 0)
    return _step_graph(gm, name, tagger, kinds, list(params) + bnames, trainable, result["grads"],
                       optimizer, precision, checkpointed, {n: p.numel() for n, p in params.items()}, counters)


def _other_leaves(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """The leaf tensors `loss.backward()` would accumulate into besides `leaves`."""
    known, found, seen = {id(t) for t in leaves}, [], set()
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)     # an AccumulateGrad node: its leaf
        if isinstance(var, torch.Tensor) and id(var) not in known:
            known.add(id(var))
            found.append(var)
        stack.extend(f for f, _ in fn.next_functions)
    return found


def _step_graph(gm, name, tagger, kinds, fqns, trainable, grads, optimizer, precision, checkpointed, numels,
                counters) -> StepGraph:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    input_kinds = {n.name: k for n, k in zip(placeholders, kinds)}
    to_param = {n.name: f for n, f, k in zip(placeholders, fqns, kinds) if k is InputKind.WEIGHT}
    to_buffer = {n.name: f for n, f, k in zip(placeholders, fqns, kinds) if k is InputKind.BUFFER}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    grad_nodes = [a for a in pytree.tree_leaves(out_node.args)][1:]
    with_grads = [n for n, g in zip(trainable, grads) if g is not None]
    gradients = {fqn: node.name for fqn, node in zip(with_grads, grad_nodes)}
    tags, last = {}, OpTag(Phase.FORWARD, "")
    for n in gm.graph.nodes:   # a node made outside an op call (a detach of an output) takes its predecessor's tag
        if n.op == "call_function":
            tags[n.name] = last = tagger.tags.get(n.name, last)
    program = _TracedProgram(gm, _SignatureShim(to_param, to_buffer, {}))
    graph = Graph(program, name=name)    # kiln's Graph reads only the program's graph and signature
    return StepGraph(graph, tags, input_kinds, gradients, optimizer, precision, checkpointed, numels, counters)


def _update(optimizer, trainable, leaves, grads, layouts, s_vals, m_vals, untraced: set[int]) -> None:
    """The optimizer's own step() on the traced tensors, its state given as graph inputs; in
    mixed precision it updates the fp32 masters and writes them back into the bf16 weights."""
    targets = m_vals or [p.detach() for p in leaves]
    opt = make_optimizer(optimizer, targets)
    it = iter(s_vals)
    for n, t, g in zip(trainable, targets, grads):
        untraced.update(id(v) for v in layouts[n].values() if v.dim() == 0)   # cloned as real tensors
        opt.state[t] = {k: next(it) if v.dim() > 0 else v.clone() for k, v in layouts[n].items()}
        untraced.update(id(v) for v in opt.state[t].values() if v.dim() == 0)
        t.grad = None if g is None else g.to(t.dtype)
    opt.step()
    for p, m in zip(leaves, m_vals):
        p.detach().copy_(m)


def autocast(dtype):
    """bf16 runs also autocast the forward, so a model that makes fp32 tensors of its own (a
    mask, a position table) still meets its bf16 weights in bf16 matmuls."""
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _cast(x, dtype):
    if dtype is not None and isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    return x


class checkpointed_forwards:
    """Runs the named submodules' forwards under torch.utils.checkpoint (non-reentrant), in
    the traced step and in a measured eager one alike; `stack` (the tracer's module stack)
    learns whose ops a recomputation runs."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...], stack: list[str] | None = None):
        self.mods = [(n, model.get_submodule(n)) for n in names]
        self.stack = stack if stack is not None else []

    def __enter__(self):
        for name, m in self.mods:
            m.forward = self._checkpointed(name, m.forward)

    def _checkpointed(self, name: str, inner: Callable) -> Callable:
        stack = self.stack

        def run(*a, **k):   # the recomputation bypasses the module's hooks: say whose ops they are
            stack.append(name)
            try:
                return inner(*a, **k)
            finally:
                stack.pop()

        return lambda *a, **k: checkpoint(run, *a, use_reentrant=False, **k)

    def __exit__(self, *exc):
        for _, m in self.mods:
            del m.forward

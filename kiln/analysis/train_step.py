"""A training step analysed: FLOPs, bytes and roofline time per phase, per-module forward and
backward FLOPs, and the memory of the step by kind with its peak.

`analyze_step(model, inputs, optimizer=, checkpoint=, precision=)` is the verb; its result,
`StepAnalysis`, is a small frozen record the planner and the pipeline split read.

Memory model (the one `kiln.analysis.memory` uses for inference, extended to a step): ops run
in graph order; an op's output is allocated when it runs and freed after the last op that
reads it or any alias of it (views, and in-place updates, which write into their input);
the step's outputs (loss, gradients) live to its end. Weights, buffers, optimizer states and
the batch live throughout. Each allocation has one kind:
- gradients: the storage of a parameter's final gradient;
- activations: made in the forward and read in the backward (saved for backward);
- temporaries: everything else (the backward's intermediate gradients, the optimizer's
  scratch, recomputed activations under checkpointing).
"""
from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from kiln.analysis.cost import AnnotateCost
from kiln.analysis.roofline import _compute_dtype, node_roofline
from kiln.graph.step import Phase, Precision, StepGraph, capture_step, checkpoint_targets, default_loss
from kiln.hardware.profiles import HardwareProfile


@dataclass(frozen=True)
class PhaseCost:
    """One phase of the step: FLOPs (flop_counter's convention), unfused bytes, roofline time
    (None without a hardware profile)."""

    flops: int
    bytes: int
    roofline_s: float | None


@dataclass(frozen=True)
class ModuleCost:
    """FLOPs of one module (its own ops, not its children's) in each phase."""

    module: str
    forward_flops: int
    backward_flops: int      # autograd's backward ops attributed to this module's forward
    recompute_flops: int     # its forward re-run in the backward by activation checkpointing
    saved_bytes: int = 0     # activations its forward ops made that the backward reads


@dataclass(frozen=True)
class MemoryByKind:
    """Bytes of each kind of memory in a training step."""

    weights: int = 0
    buffers: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0
    temporaries: int = 0
    inputs: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


KINDS = tuple(f.name for f in fields(MemoryByKind))


@dataclass(frozen=True)
class StepMemory:
    """The step's memory: its peak, what that peak is made of, and each kind's own maximum."""

    peak_bytes: int
    peak_phase: str          # the phase of the op during which the peak is reached
    peak_node: str
    at_peak: MemoryByKind
    max_by_kind: MemoryByKind   # each kind's largest live total over the step
    counter_bytes: int = 0      # the optimizer's step counters (in optimizer_states)


@dataclass(frozen=True)
class StepAnalysis:
    """What one training step costs: per phase, per module and in memory.

    `forward` includes the loss; `backward` includes checkpointing's recomputation (which
    runs inside `loss.backward()`), also given alone as `recompute`."""

    optimizer: str
    precision: str
    checkpointed: tuple[str, ...]
    params: int
    forward: PhaseCost
    backward: PhaseCost
    recompute: PhaseCost
    optimizer_update: PhaseCost
    modules: tuple[ModuleCost, ...]
    memory: StepMemory
    hardware: str | None = None
    uncounted_ops: tuple[str, ...] = ()

    @property
    def flops(self) -> int:
        return self.forward.flops + self.backward.flops + self.optimizer_update.flops

    def bytes_per_param(self) -> dict[str, float]:
        """Model states per parameter, as ZeRO counts them (arXiv 1910.02054, section 3.1:
        2 + 2 + 12 = 16 bytes for mixed-precision Adam): weights, gradients, and optimizer
        states without the step counters (one scalar per tensor, not per parameter)."""
        m, n = self.memory.max_by_kind, max(self.params, 1)
        return {"weights": m.weights / n, "gradients": m.gradients / n,
                "optimizer_states": (m.optimizer_states - self.memory.counter_bytes) / n}

    def by_module(self, depth: int | None = None) -> dict[str, ModuleCost]:
        """Module costs rolled up to `depth` dotted components (None: as recorded)."""
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        saved: dict[str, int] = defaultdict(int)
        for m in self.modules:
            key = m.module if depth is None else ".".join(m.module.split(".")[:depth])
            row = out[key]
            row[0] += m.forward_flops
            row[1] += m.backward_flops
            row[2] += m.recompute_flops
            saved[key] += m.saved_bytes
        return {k: ModuleCost(k, *v, saved[k]) for k, v in out.items()}

    def to_json(self) -> dict:
        phase = lambda p: {"flops": p.flops, "bytes": p.bytes, "roofline_s": p.roofline_s}  # noqa: E731
        mem = self.memory
        return {
            "optimizer": self.optimizer, "precision": self.precision, "checkpointed": list(self.checkpointed),
            "params": self.params, "hardware": self.hardware, "flops": self.flops,
            "forward": phase(self.forward), "backward": phase(self.backward),
            "recompute": phase(self.recompute), "optimizer_update": phase(self.optimizer_update),
            "memory": {"peak_bytes": mem.peak_bytes, "peak_phase": mem.peak_phase, "peak_node": mem.peak_node,
                       "at_peak": mem.at_peak.as_dict(), "max_by_kind": mem.max_by_kind.as_dict(),
                       "step_counter_bytes": mem.counter_bytes},
            "bytes_per_param": self.bytes_per_param(),
            "modules": [{"module": m.module, "forward_flops": m.forward_flops, "backward_flops": m.backward_flops,
                         "recompute_flops": m.recompute_flops, "saved_bytes": m.saved_bytes} for m in self.modules],
            "uncounted_ops": list(self.uncounted_ops),
        }


def analyze_step(model: torch.nn.Module, inputs: tuple = (), kwargs: dict | None = None, *,
                 optimizer: str = "adamw", checkpoint: bool | tuple[str, ...] = False,
                 precision: Precision | str = Precision.FP32, hardware: HardwareProfile | None = None,
                 loss_fn: Callable[[Any], torch.Tensor] = default_loss, name: str = "step") -> StepAnalysis:
    """Capture one training step of `model` on `inputs` and analyse it.

    `checkpoint`: True wraps the model's repeated blocks (`checkpoint_targets`), a tuple names
    the modules; `precision`: fp32, or bf16 (bf16 weights and gradients, fp32 master weights
    in the optimizer); `hardware`: a profile to give each phase its roofline time."""
    targets = checkpoint_targets(model) if checkpoint is True else tuple(checkpoint or ())
    step = capture_step(model, tuple(inputs), kwargs, loss_fn=loss_fn, optimizer=optimizer,
                        checkpointed=targets, precision=Precision(precision), name=name)
    return analyze_step_graph(step, hardware)


def analyze_step_graph(step: StepGraph, hardware: HardwareProfile | None = None) -> StepAnalysis:
    """The analysis of an already captured step."""
    record = AnnotateCost()(step.graph).record
    graph = step.graph
    totals: dict[Phase, list] = {p: [0, 0, 0.0] for p in Phase}
    modules: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    column = {Phase.FORWARD: 0, Phase.BACKWARD: 1, Phase.RECOMPUTE: 2}
    for n in graph.ops:
        tag = step.tags[n.name]
        t = totals[tag.phase]
        t[0] += n.cost.flops
        t[1] += n.cost.bytes
        if hardware is not None:
            t[2] += node_roofline(n.cost, _compute_dtype(n, graph), hardware).latency_s
        if tag.phase in column and n.cost.flops:
            modules[tag.module][column[tag.phase]] += n.cost.flops
    rf = hardware is not None
    cost = {p: PhaseCost(t[0], t[1], t[2] if rf else None) for p, t in totals.items()}
    rec, bwd = cost[Phase.RECOMPUTE], cost[Phase.BACKWARD]
    backward = PhaseCost(bwd.flops + rec.flops, bwd.bytes + rec.bytes,
                         bwd.roofline_s + rec.roofline_s if rf else None)
    trainable = sum(step.model_params.get(f, 0) for f in step.gradients)
    memory, saved = _memory(step)
    names = list(modules) + [k for k in saved if k not in modules]
    return StepAnalysis(
        step.optimizer, step.precision.value, step.checkpointed, trainable,
        cost[Phase.FORWARD], backward, rec, cost[Phase.OPTIMIZER],
        tuple(ModuleCost(k, *modules.get(k, (0, 0, 0)), saved.get(k, 0)) for k in names), memory,
        hardware.name if hardware else None, record.uncounted_ops)


def _aliased_input(fx_node: torch.fx.Node) -> torch.fx.Node | None:
    """The input whose storage an op's output shares: a view's base, an in-place op's target."""
    target = fx_node.target
    if target is operator.getitem:
        return fx_node.args[0]
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return None
    alias = schema.returns[0].alias_info.before_set
    for arg, value in zip(schema.arguments, fx_node.args):
        if arg.alias_info is not None and arg.alias_info.before_set == alias and isinstance(value, torch.fx.Node):
            return value
    return None


def step_memory(step: StepGraph) -> StepMemory:
    """Liveness of every allocation over the step's schedule, each with its kind (module doc)."""
    return _memory(step)[0]


def _memory(step: StepGraph) -> tuple[StepMemory, dict[str, int]]:
    """The step's memory, and the saved activations' bytes per module that made them."""
    graph = step.graph
    owner: dict[str, str | None] = {}          # node -> the allocation it lives in (None: persistent)
    size: dict[str, int] = {}
    born: dict[str, int] = {}
    last: dict[str, int] = {}
    read_in_backward: set[str] = set()
    persistent: dict[str, int] = defaultdict(int)
    multi: set[str] = set()
    nodes = list(graph.fx_nodes())
    for i, (fx, n) in enumerate(nodes):
        if fx.op == "placeholder":
            persistent[step.input_kinds[fx.name].value] += n.out_bytes
            owner[fx.name] = None
        elif fx.op == "get_attr":   # a tensor the forward makes (a mask): kept whole step, as scratch
            persistent["temporaries"] += n.out_bytes
            owner[fx.name] = None
        elif fx.op == "call_function" and isinstance(fx.meta.get("val"), (tuple, list)):
            owner[fx.name] = None      # a multi-output op: each output its own allocation, at its getitem
            multi.add(fx.name)
        elif fx.op == "call_function":
            base = _aliased_input(fx)
            if base is not None and base.name in multi:
                base = None
            if base is not None or (n.is_view and fx.target is not operator.getitem):
                base = base if base is not None else next(iter(fx.all_input_nodes), None)
                owner[fx.name] = owner.get(base.name) if base is not None else None
            else:
                owner[fx.name], size[fx.name], born[fx.name] = fx.name, n.out_bytes, i
        phase = step.tags.get(fx.name)
        end = len(nodes) if fx.op == "output" else i
        for a in fx.all_input_nodes:
            o = owner.get(a.name)
            if o is None:
                continue
            last[o] = max(last.get(o, i), end)
            if phase is not None and phase.phase in (Phase.BACKWARD, Phase.RECOMPUTE) \
                    and step.tags[o].phase is Phase.FORWARD:
                read_in_backward.add(o)
        if fx.name in size:
            last.setdefault(fx.name, i)
    grads = {owner.get(g) for g in step.gradients.values()} - {None}
    kind = {o: "gradients" if o in grads else "activations" if o in read_in_backward else "temporaries"
            for o in size}
    persistent["optimizer_states"] += step.counter_bytes
    saved: dict[str, int] = defaultdict(int)
    for o, k in kind.items():
        if k == "activations":
            saved[step.tags[o].module] += size[o]
    return _timeline(nodes, step, size, born, last, kind, dict(persistent)), dict(saved)


def _timeline(nodes, step, size, born, last, kind, persistent) -> StepMemory:
    live = defaultdict(int, persistent)
    peak, at_peak, peak_i = -1, {}, 0
    maxima = dict(live)
    dying: dict[int, list[str]] = defaultdict(list)
    for o, t in last.items():
        dying[t].append(o)
    born_at: dict[int, list[str]] = defaultdict(list)
    for o, t in born.items():
        born_at[t].append(o)
    for i in range(len(nodes)):
        for o in born_at.get(i, ()):
            live[kind[o]] += size[o]
        total = sum(live.values())
        if total > peak:
            peak, at_peak, peak_i = total, dict(live), i
        for k, v in live.items():
            maxima[k] = max(maxima.get(k, 0), v)
        for o in dying.get(i, ()):
            live[kind[o]] -= size[o]
    name = nodes[peak_i][0].name
    tag = step.tags.get(name)
    return StepMemory(peak, tag.phase.value if tag else "", name,
                      MemoryByKind(**{k: at_peak.get(k, 0) for k in KINDS}),
                      MemoryByKind(**{k: maxima.get(k, 0) for k in KINDS}), step.counter_bytes)

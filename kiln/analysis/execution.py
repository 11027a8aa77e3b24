"""How a compressed model runs, per module, and what that does to its cost and roofline.

A captured graph holds the float architecture: pruning's smaller shapes and low-rank factors
are already its real shapes, but the number formats of a quantized model and the zeros of a
sparse one are not in it. An `Execution` says, per module FQN, the precision its weight,
input and output are stored and computed in, and which of its weights a kernel could skip
(N:M or unstructured sparsity). `effective_costs` turns each such module's main op (the one
with FLOPs, or a lookup) into the cost of a kernel that takes its operands as stored:

- bytes: the weight at its storage bits (shared scales amortised), and only its kept values
  plus their index (N:M: log2(M) bits per kept value, as NVIDIA's 2:4 metadata; unstructured:
  a one-bit mask per weight, as `kiln prune` reports it); activations read and written at the
  bits of their quantizers;
- FLOPs: times the kept fraction of the weights where sparse, assuming a kernel that skips
  zeros (sparse tensor cores for 2:4; a sparse kernel otherwise): the output says so;
- peak: the fastest number format of the hardware profile that holds both operands exactly
  (int8 for int8 x int8, fp8 for MXFP4's E2M1 elements on an H100, bf16 on an A100 that has no
  fp8); an operand left in float keeps the op at its float dtype's peak (weight-only
  quantization saves bytes, not compute).
The graph's own (dense, float) costs stay on its nodes: an artifact is shown both ways.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from kiln.analysis.roofline import NodeRoofline, RooflineRecord, roofline
from kiln.graph.graph import Graph
from kiln.graph.node import Cost, Node, NodeKind
from kiln.hardware.profiles import DTYPE_KEYS, HardwareProfile

GATHERS = frozenset({"embedding", "index_select", "index", "gather", "embedding_bag"})


class Family(enum.Enum):
    INT = "int"          # integers (times a scale): int, fixed point, block-float mantissas, binary
    FLOAT = "float"      # sign, exponent and mantissa: minifloats, MX floating-point elements


@dataclass(frozen=True)
class Precision:
    """How one operand is stored: `bits` per element with its shared scales amortised;
    `element_bits`, `exp` and `man` describe the element a kernel multiplies."""

    name: str
    family: Family
    element_bits: int
    bits: float
    exp: int = 0
    man: int = 0


@dataclass(frozen=True)
class Sparsity:
    """Weights a kernel could skip: the kept fraction, its pattern, and index bits per weight."""

    density: float
    pattern: str          # "2:4", "unstructured"
    index_bits: float     # per weight element (kept or not)


@dataclass(frozen=True)
class ModuleExecution:
    weight: Precision | None = None
    input: Precision | None = None
    output: Precision | None = None
    sparsity: Sparsity | None = None

    def merged(self, later: ModuleExecution) -> ModuleExecution:
        """This module after a later transform: its fields win where set."""
        return replace(self, **{k: v for k, v in vars(later).items() if v is not None})


@dataclass(frozen=True)
class Execution:
    """Per module FQN, how it runs; `notes` are what the costing assumes, for the output."""

    modules: dict[str, ModuleExecution] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def merged(self, later: Execution) -> Execution:
        modules = dict(self.modules)
        for fqn, ex in later.modules.items():
            modules[fqn] = modules[fqn].merged(ex) if fqn in modules else ex
        return Execution(modules, self.notes + tuple(n for n in later.notes if n not in self.notes))


# What each profile key's number format holds exactly: integers of up to N bits (its significand
# plus sign), floats of up to (exponent, mantissa) bits. IEEE 754 binary16: 5/10; bfloat16: 8/7;
# TF32: 8/10; binary32: 8/23; OCP FP8: E4M3 and E5M2 (either one, so e5m2 elements need e5m2).
_HOLDS = {
    "int4": (4, ()), "int8": (8, ()),
    "fp8": (0, ((4, 3), (5, 2))), "fp16": (12, ((5, 10),)), "bf16": (9, ((8, 7),)),
    "tf32": (12, ((8, 10),)), "fp32": (25, ((8, 23),)), "fp64": (54, ((11, 52),)),
}


def holds(key: str, p: Precision) -> bool:
    """Whether the profile key's number format represents every value of `p`'s elements."""
    int_bits, floats = _HOLDS.get(key, (0, ()))
    if p.family is Family.INT:
        return p.element_bits <= int_bits
    return any(p.exp <= e and p.man <= m for e, m in floats)


def compute_key(a: Precision | None, b: Precision | None, base: str, hw: HardwareProfile) -> str:
    """The profile key an op with operands `a` and `b` runs at: `base` (its float dtype's) when
    either operand is not quantized, else the fastest key holding both."""
    if a is None or b is None:
        return base
    fits = [k for k in hw.peak_flops if holds(k, a) and holds(k, b)]
    return max(fits, key=lambda k: hw.peak_flops[k]) if fits else base


def _weight_input(node: Node, graph: Graph) -> str | None:
    return next((a for a in node.inputs if graph[a].kind is NodeKind.PARAM
                 and graph[a].target == f"{node.module}.weight"), None)


def _scaled(nbytes: int, p: Precision | None, itemsize: int) -> int:
    return nbytes if p is None else round(nbytes * p.bits / (8 * itemsize))


def node_effective(node: Node, graph: Graph, ex: ModuleExecution, hw: HardwareProfile) -> tuple[Cost, str]:
    """The cost of one module's main op as a kernel taking its operands as stored, and its key."""
    weight = _weight_input(node, graph)
    read = 0
    for a in dict.fromkeys(node.inputs):
        src = graph[a]
        if a == weight:
            if node.op in GATHERS:      # a lookup reads the rows it gathers, as many bytes as it writes
                read += _scaled(node.out_bytes, ex.weight, src.outputs[0].itemsize)
                continue
            numel = src.outputs[0].numel
            bits = ex.weight.bits if ex.weight else 8 * src.outputs[0].itemsize
            density = ex.sparsity.density if ex.sparsity else 1.0
            index = ex.sparsity.index_bits if ex.sparsity else 0.0
            read += round(numel * (density * bits + index) / 8)
        elif src.kind is NodeKind.PARAM or not src.outputs:
            read += src.out_bytes
        else:
            read += sum(_scaled(t.nbytes, ex.input, t.itemsize) for t in src.outputs)
    written = sum(_scaled(t.nbytes, ex.output, t.itemsize) for t in node.outputs)
    flops = node.cost.flops
    if ex.sparsity and weight is not None:
        flops = round(flops * ex.sparsity.density)
    base = DTYPE_KEYS.get(_float_dtype(node, graph), hw.fallback)
    # attention's two matmuls take quantized activations on both sides (q, k; p, v)
    other = ex.weight if weight is not None else ex.input
    key = compute_key(other, ex.input, base, hw) if node.cost.flops else base
    return Cost(flops, read, written, node.cost.counted), key


def _float_dtype(node: Node, graph: Graph) -> str:
    for name in node.inputs:
        d = graph[name].dtype
        if d.startswith(("float", "bfloat")):
            return d
    return node.dtype


def effective_costs(graph: Graph, execution: Execution, hw: HardwareProfile) -> dict[str, tuple[Cost, str]]:
    """Node name -> (cost as it runs, profile key) for each main op of an executed module (the
    op with FLOPs or a lookup, in that module itself); needs the cost pass first."""
    out: dict[str, tuple[Cost, str]] = {}
    for n in graph.ops:
        ex = execution.modules.get(n.module)
        if ex is None or n.is_view or n.cost is None or not (n.cost.flops or n.op in GATHERS):
            continue
        out[n.name] = node_effective(n, graph, ex, hw)
    return out


@dataclass(frozen=True)
class AsItRuns:
    """An artifact's totals as it runs, beside the graph's own (dense, float) ones."""

    flops: int
    bytes: int
    weight_bytes: int
    roofline: RooflineRecord
    per_node: dict[str, NodeRoofline]
    keys: dict[str, int]           # profile key -> how many ops run at it
    sparse_modules: int
    quantized_modules: int
    notes: tuple[str, ...]

    def to_json(self) -> dict:
        r = self.roofline
        return {"flops": self.flops, "bytes": self.bytes, "weight_bytes": self.weight_bytes,
                "roofline_s": r.latency_s, "bound": r.bound.value, "compute_bound_s": r.compute_s,
                "memory_bound_s": r.memory_s, "fallback_dtypes": list(r.fallback_dtypes), "op_keys": self.keys,
                "sparse_modules": self.sparse_modules, "quantized_modules": self.quantized_modules,
                "notes": list(self.notes)}


def as_it_runs(graph: Graph, execution: Execution, hw: HardwareProfile) -> AsItRuns:
    """Totals and roofline of the graph with each executed module's main op as it runs."""
    eff = effective_costs(graph, execution, hw)
    per_node, record = roofline(graph, hw, effective=eff)
    flops = sum(eff[n.name][0].flops if n.name in eff else n.cost.flops for n in graph.ops)
    nbytes = sum(eff[n.name][0].bytes if n.name in eff else n.cost.bytes for n in graph.ops)
    keys: dict[str, int] = {}
    for n in graph.ops:
        if n.cost.flops:
            k = per_node[n.name].dtype_key
            keys[k] = keys.get(k, 0) + 1
    mods = execution.modules.values()
    return AsItRuns(flops, nbytes, _weight_bytes(graph, execution), record, per_node, keys,
                    sum(1 for m in mods if m.sparsity), sum(1 for m in mods if m.weight or m.input),
                    execution.notes)


def _weight_bytes(graph: Graph, execution: Execution) -> int:
    total = 0
    for n in graph.nodes:
        if n.kind not in (NodeKind.PARAM, NodeKind.BUFFER):
            continue
        module, _, leaf = n.target.rpartition(".")
        ex = execution.modules.get(module) if leaf == "weight" else None
        if ex is None or not n.outputs:
            total += n.out_bytes
            continue
        t = n.outputs[0]
        bits = ex.weight.bits if ex.weight else 8 * t.itemsize
        density, index = (ex.sparsity.density, ex.sparsity.index_bits) if ex.sparsity else (1.0, 0.0)
        total += round(t.numel * (density * bits + index) / 8)
    return total

"""Elementwise fusion: regions a backend can fuse, and the fusions eager PyTorch has a kernel for.

`MarkFusion` is an analysis: it groups each producer (conv, linear, matmul, attention) with the
chain of elementwise ops that follows it (each the only user of the one before, same shape and
dtype) into a `FusionRegion`, and tags the nodes with a typed `FusionTag`. Backends that
generate kernels (inductor, ONNX Runtime) read the regions; eager cannot fuse them.

`FUSE` holds the rewrites that pay off in eager too: relu(a + b) -> aten._add_relu(a, b), one
pass over memory instead of two (the fusion TorchScript's fuse_add_relu pass made).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from kiln.compile.edit import arguments, is_pure, packet_name, same_meta, val
from kiln.compile.passes import PASSES, NoConfig
from kiln.compile.rewrite import Fn, Op, P, Rewrite, Rule, RuleSet, Var, tensor
from kiln.graph.graph import Graph
from kiln.graph.passes import PassResult

aten = torch.ops.aten
fx = torch.fx

FUSE = RuleSet((
    Rule("add_relu", P.relu(P.add(Var("a", tensor), Var("b", tensor)).named("sum")),
         Op((aten._add_relu.Tensor,), (Var("a"), Var("b")), (("alpha", Fn(lambda m: arguments(m["sum"])[2])),)),
         when=lambda m: len(m["sum"].users) == 1),
))

PRODUCERS = frozenset({"conv1d", "conv2d", "conv3d", "convolution", "linear", "matmul", "mm", "bmm", "addmm",
                       "baddbmm", "scaled_dot_product_attention"})


@dataclass(frozen=True)
class FusionConfig:
    max_epilogue: int = 8   # the longest chain of elementwise ops kept in one region

    def __post_init__(self):
        if self.max_epilogue < 1:
            raise ValueError(f"max_epilogue must be >= 1, got {self.max_epilogue}")


class FusionRole(enum.Enum):
    PRODUCER = "producer"
    EPILOGUE = "epilogue"


@dataclass(frozen=True)
class FusionTag:
    """Typed node metadata: the region a node belongs to and its role in it."""

    region: int
    role: FusionRole


@dataclass(frozen=True)
class FusionRegion:
    producer: str
    producer_op: str
    epilogue: tuple[str, ...]       # node names, in order
    epilogue_ops: tuple[str, ...]   # their op names
    module: str                     # FQN of the producer's module


@dataclass(frozen=True)
class FusionRecord:
    regions: tuple[FusionRegion, ...]

    @property
    def fused_ops(self) -> int:
        return sum(len(r.epilogue) for r in self.regions)


TAG_KEY = "kiln_fusion"


def fusion_tag(graph: Graph, name: str) -> FusionTag | None:
    """The FusionTag MarkFusion put on node `name`, if any."""
    for fx_node, _ in graph.fx_nodes():
        if fx_node.name == name:
            return fx_node.meta.get(TAG_KEY)
    raise KeyError(f"no node {name!r} in {graph.name}")


def elementwise(node: fx.Node) -> bool:
    """A pure pointwise op (ATen's pointwise tag; _add_relu lacks it), or eval batch norm (a
    per-channel affine)."""
    if not is_pure(node) or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if packet_name(node) == "batch_norm":
        return not arguments(node)[5]
    return torch.Tag.pointwise in node.target.tags or packet_name(node) == "_add_relu"


@PASSES.register("mark_fusion")
class MarkFusion:
    """Groups producers with their elementwise epilogues; tags nodes, changes no op."""

    name = "mark_fusion"
    Config = FusionConfig

    def __init__(self, config: FusionConfig = FusionConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult[FusionRecord]:
        regions, claimed = [], set()
        for node, record in graph.fx_nodes():
            node.meta.pop(TAG_KEY, None)
            if node.op != "call_function" or packet_name(node) not in PRODUCERS or node in claimed:
                continue
            chain, cur = [], node
            while len(cur.users) == 1 and len(chain) < self.config.max_epilogue:
                user = next(iter(cur.users))
                if user in claimed or not elementwise(user) or not same_meta(val(user), val(node), strides=False):
                    break
                chain.append(user)
                cur = user
            if not chain:
                continue
            claimed.update([node, *chain])
            regions.append(FusionRegion(node.name, packet_name(node), tuple(n.name for n in chain),
                                        tuple(packet_name(n) for n in chain), record.module))
        tags = {r.producer: FusionTag(i, FusionRole.PRODUCER) for i, r in enumerate(regions)}
        tags |= {name: FusionTag(i, FusionRole.EPILOGUE) for i, r in enumerate(regions) for name in r.epilogue}
        for fx_node, _ in graph.fx_nodes():
            if fx_node.name in tags:
                fx_node.meta[TAG_KEY] = tags[fx_node.name]
        return PassResult(graph, False, FusionRecord(tuple(regions)))


@PASSES.register("fuse")
class FuseElementwise(Rewrite):
    """The FUSE rules as a pass."""

    Config = NoConfig

    def __init__(self, config: NoConfig = NoConfig()):
        super().__init__(FUSE, name="fuse")
        self.config = config

"""The DARTS-style CNN cell space: candidate operations, genotypes, and the discrete network.

A cell takes the outputs of the two previous cells (inputs 0 and 1) and computes `nodes`
intermediate nodes; node j sums two operations applied to two earlier states
(inputs or nodes 0..j-1), and the cell's output concatenates every intermediate node
(Liu et al., "DARTS", ICLR 2019). A genotype fixes the (op, input) pairs of a normal cell and a
reduction cell (stride 2 on the cell inputs, channels doubled).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.registry import Registry

OpBuilder = Callable[[int, int], nn.Module]   # (channels, stride) -> module keeping the channels
OPS: Registry[OpBuilder] = Registry("nas operation")
ZERO = "none"


class Zero(nn.Module):
    """The 'no edge' operation: zeros of the output shape (DARTS's `none`)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__(nn.ReLU(inplace=False), nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
                         nn.BatchNorm2d(c_out, affine=affine))


class DilConv(nn.Sequential):
    """ReLU, depthwise dilated conv, pointwise conv, BN."""

    def __init__(self, c: int, kernel: int, stride: int, dilation: int, affine: bool = True):
        pad = dilation * (kernel - 1) // 2
        super().__init__(nn.ReLU(inplace=False),
                         nn.Conv2d(c, c, kernel, stride, pad, dilation=dilation, groups=c, bias=False),
                         nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c, affine=affine))


class SepConv(nn.Sequential):
    """Two stacked depthwise-separable convs, the first carrying the stride (as in DARTS)."""

    def __init__(self, c: int, kernel: int, stride: int, affine: bool = True):
        super().__init__(DilConv(c, kernel, stride, 1, affine), DilConv(c, kernel, 1, 1, affine))


class FactorizedReduce(nn.Module):
    """Halve the resolution without losing half the pixels: two 1x1 stride-2 convs, one shifted."""

    def __init__(self, c_in: int, c_out: int, affine: bool = True):
        super().__init__()
        if c_out % 2:
            raise KilnError(f"nas space: channels {c_out} must be even for a reduction")
        self.relu = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        shifted = nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return self.bn(torch.cat([self.conv1(x), self.conv2(shifted)], dim=1))


def _pool(kind: type[nn.Module]) -> OpBuilder:
    def build(c: int, stride: int) -> nn.Module:
        if kind is nn.AvgPool2d:
            return nn.AvgPool2d(3, stride, 1, count_include_pad=False)
        return nn.MaxPool2d(3, stride, 1)
    return build


OPS.register(ZERO)(lambda c, stride: Zero(stride))
OPS.register("skip_connect")(lambda c, stride: nn.Identity() if stride == 1 else FactorizedReduce(c, c, False))
OPS.register("max_pool_3x3")(_pool(nn.MaxPool2d))
OPS.register("avg_pool_3x3")(_pool(nn.AvgPool2d))
OPS.register("sep_conv_3x3")(lambda c, stride: SepConv(c, 3, stride, False))
OPS.register("sep_conv_5x5")(lambda c, stride: SepConv(c, 5, stride, False))
OPS.register("dil_conv_3x3")(lambda c, stride: DilConv(c, 3, stride, 2, False))
OPS.register("dil_conv_5x5")(lambda c, stride: DilConv(c, 5, stride, 2, False))


def build_op(name: str, c: int, stride: int, affine: bool) -> nn.Module:
    """A candidate op; BN is affine in the discrete (retrained) network, not during DARTS search."""
    op = OPS.get(name)(c, stride)
    for m in op.modules():
        if isinstance(m, nn.BatchNorm2d) and affine and not m.affine:
            m.affine = True
            m.weight = nn.Parameter(torch.ones(m.num_features))
            m.bias = nn.Parameter(torch.zeros(m.num_features))
    return op


@dataclass(frozen=True)
class CellSpace:
    """The searchable part: candidate ops and intermediate nodes per cell."""
    ops: tuple[str, ...]
    nodes: int = 4

    def __post_init__(self):
        for name in self.ops:
            OPS.get(name)
        if self.nodes < 1:
            raise KilnError(f"nas space: nodes must be at least 1, got {self.nodes}")
        if len(set(self.ops)) != len(self.ops):
            raise KilnError(f"nas space: an op is listed twice in {list(self.ops)}")
        if not self.real_ops:
            raise KilnError(f"nas space has no valid architecture: ops {list(self.ops)} hold no operation "
                            f"other than {ZERO!r}; accepted ops: {', '.join(o for o in OPS if o != ZERO)}")

    @property
    def real_ops(self) -> tuple[str, ...]:
        """The ops a discrete cell may use (the zero op only competes during DARTS search)."""
        return tuple(o for o in self.ops if o != ZERO)

    def choices(self) -> list[int]:
        """Option counts of the flat encoding the sampling strategies search over: per cell type
        and node, (first input, first op, second input, second op)."""
        per_node = [[j + 2, len(self.real_ops), j + 2, len(self.real_ops)] for j in range(self.nodes)]
        return [n for _cell in range(2) for node in per_node for n in node]

    def decode(self, code: list[int]) -> "Genotype":
        """Flat integer code (one per `choices()` entry) -> genotype."""
        if len(code) != len(self.choices()) or any(not 0 <= c < n for c, n in zip(code, self.choices())):
            raise ValueError(f"code {code} does not fit choices {self.choices()}")
        cells, k = [], 0
        for _cell in range(2):
            edges = []
            for _j in range(self.nodes):
                i1, o1, i2, o2 = code[k: k + 4]
                k += 4
                edges.append(((self.real_ops[o1], i1), (self.real_ops[o2], i2)))
            cells.append(tuple(edges))
        return Genotype(normal=cells[0], reduce=cells[1])

    def sample(self, rng: random.Random) -> "Genotype":
        return self.decode([rng.randrange(n) for n in self.choices()])


Edge = tuple[str, int]   # (op name, input index: 0/1 the cell inputs, 2+ intermediate nodes)


@dataclass(frozen=True)
class Genotype:
    """A discrete architecture: per node of each cell type, two (op, input) edges."""
    normal: tuple[tuple[Edge, ...], ...]
    reduce: tuple[tuple[Edge, ...], ...]

    def to_dict(self) -> dict:
        return {"normal": [[list(e) for e in node] for node in self.normal],
                "reduce": [[list(e) for e in node] for node in self.reduce]}

    @classmethod
    def from_dict(cls, data: dict) -> "Genotype":
        def cell(nodes) -> tuple:
            return tuple(tuple((str(op), int(i)) for op, i in node) for node in nodes)
        try:
            return cls(normal=cell(data["normal"]), reduce=cell(data["reduce"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise KilnError(f"genotype: malformed record ({exc}); expected normal/reduce lists of [op, input]") from None

    def check(self) -> None:
        for name, cell in (("normal", self.normal), ("reduce", self.reduce)):
            for j, node in enumerate(cell):
                for op, i in node:
                    OPS.get(op)
                    if not 0 <= i < j + 2:
                        raise KilnError(f"genotype: {name} node {j} reads state {i}; states 0..{j + 1} exist")


@dataclass(frozen=True)
class Macro:
    """The fixed outer skeleton around the cells."""
    channels: int = 8          # C of the first cell; doubled at each reduction
    layers: int = 3            # cells; reductions at layers//3 and 2*layers//3 (DARTS's rule)
    stem_multiplier: int = 2
    stem_stride: int = 2       # 28x28 digits enter the first cell at 14x14 (CPU budget)
    in_channels: int = 1
    num_classes: int = 10

    def reductions(self) -> set[int]:
        if self.layers < 3:
            return {self.layers - 1} if self.layers == 2 else set()
        return {self.layers // 3, 2 * self.layers // 3}


class Cell(nn.Module):
    """A discrete cell built from one cell type of a genotype."""

    def __init__(self, edges, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.multiplier = len(edges)
        self.pre0 = FactorizedReduce(c_pp, c) if reduction_prev else ReLUConvBN(c_pp, c, 1, 1, 0)
        self.pre1 = ReLUConvBN(c_p, c, 1, 1, 0)
        self.inputs = [[i for _op, i in node] for node in edges]
        self.ops = nn.ModuleList(
            nn.ModuleList(build_op(op, c, 2 if reduction and i < 2 else 1, affine=True) for op, i in node)
            for node in edges)

    def forward(self, s0, s1):
        states = [self.pre0(s0), self.pre1(s1)]
        for ops, inputs in zip(self.ops, self.inputs):
            states.append(sum(op(states[i]) for op, i in zip(ops, inputs)))
        return torch.cat(states[2:], dim=1)


def stem(macro: Macro) -> tuple[nn.Module, int]:
    c = macro.stem_multiplier * macro.channels
    return nn.Sequential(nn.Conv2d(macro.in_channels, c, 3, macro.stem_stride, 1, bias=False), nn.BatchNorm2d(c)), c


class CellNetwork(nn.Module):
    """Stem, `layers` cells, global pooling and a linear classifier: the network a genotype names.
    `make_cell(reduction, c_pp, c_p, c, reduction_prev)` builds each cell (discrete or mixed)."""

    def __init__(self, macro: Macro, make_cell):
        super().__init__()
        self.stem, c_stem = stem(macro)
        c_pp, c_p, c = c_stem, c_stem, macro.channels
        self.cells = nn.ModuleList()
        reduction_prev = False
        for layer in range(macro.layers):
            reduction = layer in macro.reductions()
            c = c * 2 if reduction else c
            cell = make_cell(reduction, c_pp, c_p, c, reduction_prev)
            self.cells.append(cell)
            c_pp, c_p, reduction_prev = c_p, c * cell.multiplier, reduction
        self.classifier = nn.Linear(c_p, macro.num_classes)

    def features(self, x):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return s1.mean(dim=(2, 3))

    def forward(self, x):
        return self.classifier(self.features(x))


def discrete_network(genotype: Genotype, macro: Macro) -> CellNetwork:
    """The stand-alone network of a genotype (affine BN), ready to train from scratch."""
    genotype.check()

    def make_cell(reduction, c_pp, c_p, c, reduction_prev):
        return Cell(genotype.reduce if reduction else genotype.normal, c_pp, c_p, c, reduction, reduction_prev)
    return CellNetwork(macro, make_cell)


def discretise(weights: torch.Tensor, space: CellSpace, keep: int = 2) -> tuple[tuple[Edge, ...], ...]:
    """DARTS's derivation for one cell type: `weights` is (edges, ops) softmaxed alphas, edges
    ordered node by node (node j has j+2 incoming). Per node keep the `keep` incoming edges whose
    strongest non-zero op is strongest, each with that op."""
    real = [k for k, name in enumerate(space.ops) if name != ZERO]
    nodes, start = [], 0
    for j in range(space.nodes):
        w = weights[start: start + j + 2]
        start += j + 2
        best_w, best_op = w[:, real].max(dim=1)
        order = sorted(range(j + 2), key=lambda i: (-float(best_w[i]), i))[: min(keep, j + 2)]
        nodes.append(tuple((space.ops[real[int(best_op[i])]], i) for i in sorted(order)))
    if start != weights.shape[0]:
        raise ValueError(f"weights have {weights.shape[0]} edges; a {space.nodes}-node cell has {start}")
    return tuple(nodes)

"""Every matrix product of a captured model as (M, N, K): what an accelerator's array computes.

Read from the exported graph's shapes, in SCALE-Sim's convention for convolutions (M output
pixels times batch, N output channels per group, K = input channels per group x kernel size,
repeated per group). Their 2·M·N·K sum equals the FLOPs kiln.analysis counts for the same
nodes (tests/test_hw_systolic.py holds them to torch.utils.flop_counter).
"""
from __future__ import annotations

from math import prod
from typing import Any

import torch

from kiln.errors import KilnError
from kiln.graph.capture import capture
from kiln.graph.graph import Graph
from kiln.graph.node import NodeKind
from kiln.hw.systolic import Gemm
from kiln.models.inputs import with_input_shapes
from kiln.models.loaded import LoadedModel
from kiln.runs.artifact import load_source

LINEAR = frozenset({"linear"})
MATMUL = frozenset({"mm", "bmm", "matmul"})
ADDMM = frozenset({"addmm", "baddbmm"})
CONV = frozenset({"convolution", "_convolution", "conv1d", "conv2d", "conv3d"})
SDPA = frozenset({"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"})


def _shape(a: Any) -> tuple[int, ...] | None:
    val = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def _arg(fx_node: torch.fx.Node, i: int, default: Any) -> Any:
    return fx_node.args[i] if len(fx_node.args) > i else default


def node_gemms(fx_node: torch.fx.Node, op: str, name: str) -> list[Gemm]:
    """The GEMMs one graph node performs (none for an op that is not a matrix product)."""
    ins = [_shape(a) for a in fx_node.args]
    val = fx_node.meta.get("val")
    out = tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None
    if out is None:
        return []
    if op in LINEAR:              # x (..., K) @ W(N, K)^T
        return [Gemm(name, prod(out[:-1]), out[-1], ins[0][-1])]
    if op in ADDMM:               # bias + a (.., M, K) @ b (.., K, N)
        a = ins[1]
        return [Gemm(name, out[-2], out[-1], a[-1], prod(out[:-2]))]
    if op in MATMUL:
        a, b = ins[0], ins[1]
        if len(a) == 1:           # vector @ (batched) matrix
            return [Gemm(name, 1, b[-1], a[0], prod(b[:-2]))]
        if len(b) == 1:           # (batched) matrix @ vector
            return [Gemm(name, prod(a[:-1]), 1, a[-1])]
        if len(b) == 2:           # (..., M, K) @ (K, N): the leading dims are more rows
            return [Gemm(name, prod(out[:-1]), out[-1], a[-1])]
        return [Gemm(name, out[-2], out[-1], a[-1], prod(out[:-2]))]
    if op in CONV:
        return _conv(fx_node, op, name, ins, out)
    if op in SDPA:                # Q K^T then P V, per batch and head
        q, k, v = ins[0], ins[1], ins[2]
        heads = prod(q[:-2])
        return [Gemm(f"{name}.qk", q[-2], k[-2], q[-1], heads), Gemm(f"{name}.pv", q[-2], v[-1], k[-2], heads)]
    return []


def _conv(fx_node: torch.fx.Node, op: str, name: str, ins: list, out: tuple[int, ...]) -> list[Gemm]:
    x, w = ins[0], ins[1]
    transposed = op.endswith("convolution") and bool(_arg(fx_node, 6, False))
    if transposed:   # a transposed convolution is counted on its input pixels, as flop_counter does
        groups = int(_arg(fx_node, 8, 1))
        batch = x[0] if len(x) == len(w) else 1
        pixels = prod(x[2 if len(x) == len(w) else 1:])
        cin_g, cout_g = w[0] // groups, w[1]
        return [Gemm(name, batch * pixels, cout_g * prod(w[2:]), cin_g, groups)]
    groups = int(_arg(fx_node, 8 if op.endswith("convolution") else 6, 1))
    batched = len(x) == len(w)
    batch = out[0] if batched else 1
    pixels = prod(out[2 if batched else 1:])
    cout_g, cin_g = w[0] // groups, w[1]
    return [Gemm(name, batch * pixels, cout_g, cin_g * prod(w[2:]), groups)]


def graph_gemms(graph: Graph) -> list[Gemm]:
    """The model's GEMMs in execution order, named by the module they ran in (or the node)."""
    gemms: list[Gemm] = []
    for fx_node, node in graph.fx_nodes():
        if node.kind is NodeKind.OP:
            gemms += node_gemms(fx_node, node.op, node.module or node.name)
    return gemms


def source_gemms(src: str, input_shapes: list[str] | None = None) -> list[Gemm]:
    """Load a model spec or run directory, capture it on its example input (or `input_shapes`,
    `DIMS` or `NAME=DIMS`) and list its GEMMs. A model torch.export cannot capture is a
    KilnError naming the construct; one without any matrix product is one too."""
    source = load_source(src)
    loaded = source.loaded
    loaded = LoadedModel(src, source.model.eval(), loaded.example_inputs, loaded.example_kwargs,
                         loaded.family, loaded.task)
    loaded = with_input_shapes(loaded, list(input_shapes or []))
    gemms = graph_gemms(capture(loaded))
    if not gemms:
        raise KilnError(f"{src} has no matrix product (Linear, Conv, matmul, attention) for an array to run")
    return gemms

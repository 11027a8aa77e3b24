"""FLOP formulas per ATen op, in torch.utils.flop_counter's convention (a multiply-add is 2).

The exported graph keeps high-level ops (linear, conv2d, scaled_dot_product_attention,
matmul), so each formula reads the node's input and output shapes. Ops with no formula here
that decompose into others (CompositeImplicitAutograd, e.g. einsum) are counted by
dispatching them on meta tensors under FlopCounterMode; every other op is a known zero
(elementwise, norms, reductions, data movement), as in flop_counter.
"""
from __future__ import annotations

from math import prod
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from kiln.registry import Registry

Shape = tuple[int, ...]
# formula(op name, input shapes (None for a non-tensor arg), output shapes, raw args) -> FLOPs
Formula = Callable[[str, Sequence[Any], Sequence[Shape], tuple], int]
FORMULAS: Registry[Formula] = Registry("FLOP formula")


def _register(*ops: str):
    def deco(fn: Formula) -> Formula:
        for op in ops:
            FORMULAS.register(op)(fn)
        return fn

    return deco


@_register("mm", "bmm", "matmul", "linear")
def _matmul(op, ins, outs, args) -> int:
    # every output element is a dot product over the last dim of the first operand
    return 2 * prod(outs[0]) * ins[0][-1]


@_register("addmm", "baddbmm", "addbmm")
def _addmm(op, ins, outs, args) -> int:
    # the bias/accumulator add is not counted, as in flop_counter
    return 2 * prod(ins[1][:-1]) * ins[1][-1] * ins[2][-1] if op == "addbmm" else 2 * prod(outs[0]) * ins[1][-1]


@_register("grouped_mm_fallback", "_grouped_mm")
def _grouped_mm(op, ins, outs, args) -> int:
    # mixture-of-experts: tokens (S, K) sorted by expert times per-expert weights (E, K, N);
    # every token row meets exactly one expert's matrix, so 2*S*K*N
    x, w, out = ins[0], ins[1], outs[0]
    if len(x) == 2 and len(w) == 3:
        return 2 * prod(out) * x[-1]
    if len(x) == 2 and len(w) == 2 and len(out) == 3:
        # the weight gradient (K, S) x (S, N) -> (E, K, N): each token's row contributes to its
        # own expert's gradient only, so 2*K*N*S, not E times that
        return 2 * prod(out[1:]) * x[-1]
    return 2 * prod(out) * w[-2]


@_register("convolution", "_convolution", "conv1d", "conv2d", "conv3d",
           "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv(op, ins, outs, args) -> int:
    x, w, out = ins[0], ins[1], outs[0]
    transposed = op.startswith("conv_transpose") or (op.endswith("convolution") and bool(args[6]))
    batched = len(x) == len(w)  # an unbatched input lacks the batch dim
    spatial = (x if transposed else out)[2 if batched else 1:]
    return 2 * (x[0] if batched else 1) * prod(spatial) * prod(w)


@_register("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_cudnn_attention")
def _sdpa(op, ins, outs, args) -> int:
    return sdpa_flops(ins[0], ins[1], ins[2])


@_register("convolution_backward")
def _conv_backward(op, ins, outs, args) -> int:
    # the input gradient is a transposed convolution and the weight gradient a convolution of
    # the same size as the forward: each costs the forward's FLOPs, counted when asked for
    # (output_mask: input, weight, bias)
    fwd = _conv("convolution", [ins[1], ins[2]], [ins[0]], (None,) * 6 + (args[7],))
    return fwd * (int(bool(args[10][0])) + int(bool(args[10][1])))


@_register("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward",
           "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention_backward")
def _sdpa_backward(op, ins, outs, args) -> int:
    # as flop_counter counts a fused kernel's backward: the scores Q K^T recomputed, then two
    # matmuls for the gradients of each of the forward's two: 2*B*H*Sq*Sk*(3*Dqk + 2*Dv)
    q, k, v = ins[1], ins[2], ins[3]
    return 2 * prod(q[:-2]) * q[-2] * k[-2] * (3 * q[-1] + 2 * v[-1])


def sdpa_flops(q: Shape, k: Shape, v: Shape) -> int:
    """Q @ K^T then P @ V: 2*B*H*Sq*Sk*(Dqk + Dv); K and V may have fewer heads (GQA)."""
    *batch, s_q, d_qk = q
    return 2 * prod(batch) * s_q * k[-2] * (d_qk + v[-1])


def sdpa_custom_mapping() -> dict:
    """flop_counter has no formula for the CPU fused-attention op: give it the GPU one's.

    Used by `dispatch_flops`, and by tests that hold kiln against flop_counter.
    """

    def cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flops(tuple(query), tuple(key), tuple(value))

    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash}


def dispatch_flops(target: torch._ops.OpOverload, args: tuple, kwargs: dict) -> int:
    """FLOPs of one op, found by running it (on meta tensors) under FlopCounterMode."""
    with FlopCounterMode(display=False, custom_mapping=sdpa_custom_mapping()) as counter:
        target(*args, **kwargs)
    return counter.get_total_flops()


def decomposes(target: Any) -> bool:
    """Whether an op is CompositeImplicitAutograd (runs as other ops, which may hold FLOPs)."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(target.name(), "CompositeImplicitAutograd")

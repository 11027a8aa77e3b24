"""The bit-exact integer model of the emitted design (numpy), and its cycle counts.

Every operation is the RTL's: exact integer accumulation, acc * m + b, an arithmetic right shift
rounding half to even, a clamp. Matmuls run in float64 where that is exact: every partial sum
of integer products below 2^53 is represented exactly (the accumulator widths, derived from the
ranges, are checked against it), which is much faster than numpy's integer matmul.
"""
from __future__ import annotations

import numpy as np

from kiln.errors import KilnError
from kiln.hw.ir import Layer


def round_shift(v: np.ndarray, shift: int) -> np.ndarray:
    """v / 2^shift rounded half to even (torch.round's convention), on int64."""
    if shift == 0:
        return v
    q = v >> shift                       # floor
    r = v - (q << shift)
    half = np.int64(1) << (shift - 1)
    return q + ((r > half) | ((r == half) & ((q & 1) == 1))).astype(np.int64)


def _im2col(x: np.ndarray, lay: Layer) -> np.ndarray:
    """(B, C, H, W) -> (B, P, C*kh*kw), zero padded, in torch's (C, kh, kw) weight order."""
    k, s, p = lay.kernel[0], lay.stride, lay.padding
    if p:
        x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s]
    b, c, oh, ow = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(b, oh * ow, c * k * k)


def dense_acc(x: np.ndarray, lay: Layer) -> np.ndarray:
    """The accumulators (B, N, P) of a dense layer for input codes x (B, C, H, W)."""
    if lay.acc_bits > 53:
        raise KilnError(f"layer {lay.name}: a {lay.acc_bits}-bit accumulator is beyond the integer model's exact range")
    cols = _im2col(x, lay).astype(np.float64)
    w = lay.weight.reshape(lay.n, -1).astype(np.float64)
    return np.rint(cols @ w.T).astype(np.int64).transpose(0, 2, 1)


def run_layer(x: np.ndarray, lay: Layer) -> np.ndarray:
    """One layer on a batch of input codes (B, C, H, W) -> output codes (B, C', H', W')."""
    b = x.shape[0]
    x = x.reshape(b, *lay.in_shape).astype(np.int64)
    if lay.kind == "maxpool":
        k, s = lay.kernel[0], lay.stride
        win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s]
        return win.max(axis=(4, 5)).reshape(b, *lay.out_shape)
    if lay.kind == "avgpool":
        k, s = lay.kernel[0], lay.stride
        win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s]
        acc = win.sum(axis=(4, 5))
        return np.clip(round_shift(acc * lay.mult[0] + lay.bias[0], lay.shift), lay.out_lo, lay.out_hi)
    acc = dense_acc(x, lay)
    y = round_shift(acc * lay.mult[None, :, None] + lay.bias[None, :, None], lay.shift)
    return np.clip(y, lay.out_lo, lay.out_hi).reshape(b, *lay.out_shape)


def run(x: np.ndarray, layers: list[Layer], trace: bool = False):
    """The network on input codes x (B, ...) -> output codes (B, N_out); with trace, every
    layer's output codes too."""
    outs = []
    for lay in layers:
        x = run_layer(x, lay)
        outs.append(x)
    y = x.reshape(x.shape[0], -1)
    return (y, outs) if trace else y

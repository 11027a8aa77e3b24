"""From a quantized kiln model to a chain of integer layers (what the RTL and the integer model run).

The quantized model (kiln.quant: `QuantOp`s with weight and input quantizers) is run once on its
example input with forward hooks on its leaf modules; the calls must form a chain (each module's
input is the previous one's output, up to a flatten), else the model has a residual add or
another functional op between modules that this emitter does not lower.

Integer arithmetic (the rounding conventions that make it match the fake-quantized model):
- A layer's input codes are clamp(round_half_even(x / s_x), qmin, qmax), as kiln.quant rounds;
  its weight codes the same with the weight's per-tensor or per-channel scale.
- The accumulator is the exact integer sum of code products (its width is derived from the
  codes' ranges below: no overflow).
- Bias, folded BatchNorm (a*y + b per channel) and the next layer's input scale make one
  per-channel affine map acc -> acc * M_c + B_c in units of the next layer's codes; the RTL and
  the integer model use M_c ~ m_c / 2^shift and B_c ~ b_c / 2^shift with integer m_c (MULT_BITS
  bits) and b_c, then round half to even and clamp to the next layer's code range (ReLU: lower
  bound 0). When every scale is a power of two (format `fixed`, or int scales that are powers
  of two) and no BatchNorm follows, m_c is a power of two: a shift, no multiplier.
- The fake-quantized model does the same map in float32, so the codes can differ by one where
  acc*M + B lies within the representation error of a rounding boundary; kiln hw reports how
  often (`agreement`), the RTL itself is compared bit for bit with the integer model.
- The last layer's outputs are 16-bit codes on one scale shared by all classes (so argmax over
  codes is argmax over logits).
- Accumulator widths are exact: per output channel the sum over k of max(w*lo, w*hi) (and min),
  with [lo, hi] the input codes' range. Every range holds 0, so each term's max is >= 0 and its
  min <= 0: partial sums (the RTL adds PI products per cycle) stay inside the full sum's range.
- Max pooling commutes with the monotone rounding and clamp: exact on codes. Average pooling:
  the layer before writes unclamped codes on a grid k*k*2^AVG_EXTRA_BITS times finer, the pool
  sums, divides and rounds once; it differs from the float mean only near a rounding boundary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.quant.formats import FixedPoint, IntFormat
from kiln.quant.modules import QuantOp
from kiln.quant.quantizer import Granularity, Quantizer

MULT_BITS = 18        # requantization multiplier, signed: one DSP48 input (25x18) / SB_MAC16 pair
OUT_BITS = 16         # the last layer's output codes
AVG_EXTRA_BITS = 6    # fraction bits kept into an average pool: a rounding differs from the
                      # fake-quantized model's (mean in float) only within 2^-7 of a boundary
SUPPORTED = ("Linear", "Conv2d (groups=1, dilation=1)", "BatchNorm after a Conv2d/Linear", "ReLU",
             "MaxPool2d", "AvgPool2d", "Flatten", "Dropout/Identity (eval)")
SUPPORTED_FORMATS = ("int (signed or unsigned, symmetric, per-tensor or per-channel weight scales, "
                     "per-tensor input scales, 2..16 bits)", "fixed (width 2..16: power-of-two scale)")


@dataclass(frozen=True)
class Grid:
    """Integer codes [lo, hi] and their scale (float64, per channel or a 1-element array)."""

    lo: int
    hi: int
    scale: np.ndarray
    pow2: bool

    @property
    def bits(self) -> int:
        return signed_bits(self.lo, self.hi)


def signed_bits(lo: int, hi: int) -> int:
    """Two's-complement bits holding every integer in [lo, hi] (a sign bit always)."""
    return max(int(lo).bit_length() if lo < 0 else 0, int(hi).bit_length()) + 1 if lo < 0 or hi > 0 else 1


@dataclass
class Layer:
    """One hardware layer. kind: 'dense' (Linear, or Conv2d as a dense map per output position)
    or 'maxpool'/'avgpool'. Shapes are (C, H, W), or (N, 1, 1) for a Linear."""

    name: str
    kind: str
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    in_lo: int
    in_hi: int
    out_lo: int = 0
    out_hi: int = 0
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: int = 0
    weight: np.ndarray | None = None    # int64 (Cout, Cin, kh, kw)
    mult: np.ndarray | None = None      # int64 (Cout,)
    bias: np.ndarray | None = None      # int64 (Cout,)
    shift: int = 0
    relu: bool = False
    reuse: int = 1
    meta: dict = field(default_factory=dict)

    @property
    def positions(self) -> int:
        return self.out_shape[1] * self.out_shape[2]

    @property
    def k(self) -> int:
        """Reduction length of one output (Cin * kh * kw)."""
        return self.in_shape[0] * self.kernel[0] * self.kernel[1]

    @property
    def n(self) -> int:
        return self.out_shape[0]

    @property
    def in_bits(self) -> int:
        return signed_bits(self.in_lo, self.in_hi)

    @property
    def out_bits(self) -> int:
        return signed_bits(self.out_lo, self.out_hi)

    def acc_range(self) -> tuple[int, int]:
        """The exact range of the accumulator over every input in [in_lo, in_hi]: per output
        channel, sum_k max/min(w*lo, w*hi); the layer's range is the widest channel's."""
        if self.kind == "avgpool":
            k = self.kernel[0] * self.kernel[1]
            return k * self.in_lo, k * self.in_hi
        w = self.weight.reshape(self.n, -1)
        hi = np.maximum(w * self.in_lo, w * self.in_hi).sum(1)
        lo = np.minimum(w * self.in_lo, w * self.in_hi).sum(1)
        return int(lo.min()), int(hi.max())

    @property
    def acc_bits(self) -> int:
        return signed_bits(*self.acc_range())

    def product_range(self) -> tuple[int, int]:
        """Range of acc * m + b (before the rounding shift), exact from the ranges."""
        lo, hi = self.acc_range()
        cands = [lo * self.mult + self.bias, hi * self.mult + self.bias]
        return int(np.minimum(*cands).min()), int(np.maximum(*cands).max())


def quant_grid(q: Quantizer | None, what: str, per_channel_ok: bool) -> Grid:
    if q is None:
        raise KilnError(f"{what} is not quantized (float); the emitter needs integer or fixed-point "
                        f"formats: {'; '.join(SUPPORTED_FORMATS)}")
    fmt, spec = q.spec.format, q.spec
    bad = f"{what} has format {fmt.describe()}"
    if isinstance(fmt, FixedPoint):
        if fmt.width > 16:
            raise KilnError(f"{bad}: more than 16 bits; supported: {'; '.join(SUPPORTED_FORMATS)}")
        return Grid(-(2 ** (fmt.width - 1)), 2 ** (fmt.width - 1) - 1, np.array([2.0 ** -fmt.frac]), True)
    if not isinstance(fmt, IntFormat) or not fmt.symmetric:
        raise KilnError(f"{bad}, which the emitter does not support; supported: {'; '.join(SUPPORTED_FORMATS)}")
    if spec.runtime_scale:
        raise KilnError(f"{bad} with dynamic (run-time) scales; the emitter needs calibrated scales")
    gran = spec.granularity
    if gran is Granularity.GROUP or (gran is Granularity.CHANNEL and not per_channel_ok):
        raise KilnError(f"{bad} with {gran.value} scales; supported: per-channel or per-tensor weight "
                        "scales, per-tensor input scales")
    if not q.calibrated:
        raise KilnError(f"{what} is not calibrated")
    scale = q.scale.detach().double().reshape(-1).numpy()
    pow2 = bool(np.all(np.frexp(scale)[0] == 0.5))
    return Grid(int(fmt.qmin), int(fmt.qmax), scale, pow2)


def codes(x: torch.Tensor, q: Quantizer) -> torch.Tensor:
    """Integer codes of x under quantizer q, rounded exactly as kiln.quant's fake quantization
    does (float32 x / scale, round half to even, clamp): code * scale is the fake-quantized value."""
    fmt = q.spec.format
    if isinstance(fmt, FixedPoint):
        step = 2.0 ** -fmt.frac
        return torch.clamp(torch.round(x / step), -(2 ** (fmt.width - 1)), 2 ** (fmt.width - 1) - 1)
    return torch.clamp(torch.round(x / q.scale), fmt.qmin, fmt.qmax)


def _trace(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """(name, module, input, output) of every leaf call, in call order (a QuantOp is a leaf)."""
    calls, handles = [], []
    skip_under: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in skip_under):
            continue
        if isinstance(m, QuantOp):
            skip_under.append(name)
        elif next(m.children(), None) is not None:
            continue
        handles.append(m.register_forward_hook(
            lambda mod, inp, out, name=name: calls.append((name, mod, inp[0].detach(), out.detach()))))
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
    calls.append(("<output>", None, out.detach(), out.detach()))
    return calls


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() == b.numel() and torch.equal(a.reshape(-1), b.reshape(-1))


def _shape3(t: torch.Tensor) -> tuple[int, int, int]:
    s = tuple(t.shape[1:])
    return (s[0], 1, 1) if len(s) == 1 else tuple(s)   # type: ignore[return-value]


def _op_name(m: nn.Module) -> str:
    return type(m.module).__name__ if isinstance(m, QuantOp) else type(m).__name__


def _bn_affine(bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm in eval as y*a + b (float64)."""
    var = bn.running_var.double().numpy()
    a = (bn.weight.detach().double().numpy() if bn.weight is not None else 1.0) / np.sqrt(var + bn.eps)
    b = (bn.bias.detach().double().numpy() if bn.bias is not None else 0.0) - bn.running_mean.double().numpy() * a
    return a, b


def _fixed_point(real_mult: np.ndarray, real_bias: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(m, b, shift) with m / 2^shift ~ real_mult and b / 2^shift ~ real_bias, |m| < 2^(MULT_BITS-1).

    When every multiplier is one power of two 2^-e the map is a shift by e (m = 1): exact."""
    mant, exp = np.frexp(real_mult)
    if np.all(np.abs(mant) == 0.5) and len(set(exp.tolist())) == 1 and exp[0] <= 1:
        shift = int(1 - exp[0])
        m = np.sign(real_mult).astype(np.int64)
    else:
        top = float(np.abs(real_mult).max())
        if top == 0.0:
            shift = 0
        else:
            # the largest shift keeping round(|M| * 2^shift) <= 2^(MULT_BITS-1) - 1, at most 48
            shift = int(min(48, math.floor(math.log2((2 ** (MULT_BITS - 1) - 1) / top))))
            while shift > 0 and np.abs(np.round(real_mult * 2.0 ** shift)).max() > 2 ** (MULT_BITS - 1) - 1:
                shift -= 1
        m = np.round(real_mult * 2.0 ** shift).astype(np.int64)
    b = np.round(real_bias * 2.0 ** shift).astype(np.int64)
    return m, b, max(shift, 0)


@dataclass
class _Dense:
    name: str
    op: QuantOp
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    a: np.ndarray
    b: np.ndarray
    relu: bool = False


def _collect(calls) -> list:
    """Group the traced calls into dense groups (op + folded BN + ReLU) and pools."""
    items: list = []
    prev = calls[0][2]
    for name, m, inp, out in calls[:-1]:
        if not _same(inp, prev):
            raise KilnError(f"{name} ({_op_name(m)}) does not take the previous layer's output: a residual "
                            f"add or another functional op sits between them, which the emitter does not "
                            f"support; supported: {', '.join(SUPPORTED)}")
        prev = out
        kind = _op_name(m)
        if isinstance(m, QuantOp):
            mod = m.module
            if kind not in ("Linear", "Conv2d"):
                raise KilnError(f"layer {name} is a {kind}; supported: {', '.join(SUPPORTED)}")
            if kind == "Conv2d" and (mod.groups != 1 or mod.dilation != (1, 1) or mod.kernel_size[0] != mod.kernel_size[1]
                                     or len(set(mod.stride)) != 1 or len(set(mod.padding)) != 1 or mod.padding_mode != "zeros"):
                raise KilnError(f"layer {name} is a Conv2d with groups/dilation/non-square kernel, stride or padding; "
                                f"supported: {', '.join(SUPPORTED)}")
            n = mod.weight.shape[0]
            bias = mod.bias.detach().double().numpy() if mod.bias is not None else np.zeros(n)
            items.append(_Dense(name, m, _shape3(inp), _shape3(out), np.ones(n), bias))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if not items or not isinstance(items[-1], _Dense) or items[-1].relu:
                raise KilnError(f"layer {name} is a BatchNorm that does not follow a Conv2d/Linear directly; "
                                f"supported: {', '.join(SUPPORTED)}")
            a, b = _bn_affine(m)
            items[-1].a, items[-1].b = items[-1].a * a, items[-1].b * a + b
        elif isinstance(m, nn.ReLU):
            if not items or not isinstance(items[-1], _Dense):
                raise KilnError(f"layer {name} is a ReLU that does not follow a Conv2d/Linear(+BatchNorm); "
                                f"supported: {', '.join(SUPPORTED)}")
            items[-1].relu = True
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            k, s, p = m.kernel_size, m.stride, m.padding
            k = k if isinstance(k, int) else k[0]
            s = s if isinstance(s, int) else s[0]
            if p not in (0, (0, 0)) or getattr(m, "ceil_mode", False) or getattr(m, "dilation", 1) not in (1, (1, 1)):
                raise KilnError(f"layer {name} is a {kind} with padding, dilation or ceil_mode; supported: "
                                f"{', '.join(SUPPORTED)}")
            items.append(("maxpool" if isinstance(m, nn.MaxPool2d) else "avgpool", name, _shape3(inp), _shape3(out), k, s))
        elif isinstance(m, (nn.Dropout, nn.Identity, nn.Flatten)):
            continue
        else:
            raise KilnError(f"layer {name} is a {kind}, which the emitter does not support; "
                            f"supported: {', '.join(SUPPORTED)}")
    if not _same(calls[-1][2], prev):
        raise KilnError("the model's output is not its last layer's output (a functional op follows it); "
                        f"supported: {', '.join(SUPPORTED)}")
    if not items or not isinstance(items[0], _Dense):
        raise KilnError("the model must start with a quantized Linear or Conv2d (a flatten before it is fine)")
    return items


def lower(model: nn.Module, example: torch.Tensor) -> list[Layer]:
    """The integer layers of a quantized model, in order (see the module docstring)."""
    model = model.eval()
    items = _collect(_trace(model, example[:1]))
    denses = [i for i, it in enumerate(items) if isinstance(it, _Dense)]
    layers: list[Layer] = []
    for idx, it in enumerate(items):
        if not isinstance(it, _Dense):
            kind, name, ins, outs, k, s = it
            prev = layers[-1]
            f = prev.meta.get("avg_factor", 1)
            out_lo, out_hi = prev.meta.get("pool_range", (prev.out_lo, prev.out_hi))
            lay = Layer(name, kind, ins, outs, prev.out_lo, prev.out_hi, out_lo, out_hi, (k, k), s)
            if kind == "avgpool":
                # the layer before wrote unclamped codes on a k*k*2^AVG_EXTRA_BITS finer grid:
                # the mean is sum / (k*k*f), rounded half to even (a shift for k*k a power of two)
                lay.mult, lay.bias, lay.shift = _fixed_point(np.array([1.0 / (k * k * f)]), np.zeros(1))
            layers.append(lay)
            continue
        xg = quant_grid(it.op.input_q, f"layer {it.name} input", per_channel_ok=False)
        wg = quant_grid(it.op.weight_q, f"layer {it.name} weight", per_channel_ok=True)
        w = codes(it.op.module.weight.detach(), it.op.weight_q).to(torch.int64).numpy()
        w = w.reshape(w.shape[0], w.shape[1], *(w.shape[2:] or (1, 1)))
        if layers and (layers[-1].out_lo < xg.lo or layers[-1].out_hi > xg.hi):
            raise KilnError(f"layer {it.name}: its input range [{layers[-1].out_lo}, {layers[-1].out_hi}] "
                            f"exceeds its input format's [{xg.lo}, {xg.hi}]")
        in_lo, in_hi = (layers[-1].out_lo, layers[-1].out_hi) if layers else (xg.lo, xg.hi)
        mod = it.op.module
        conv = isinstance(mod, nn.Conv2d)
        lay = Layer(it.name, "dense", it.in_shape, it.out_shape, in_lo, in_hi,
                    kernel=tuple(mod.kernel_size) if conv else (1, 1),
                    stride=mod.stride[0] if conv else 1, padding=mod.padding[0] if conv else 0,
                    weight=w, relu=it.relu,
                    meta={"op": type(mod).__name__, "weight_format": it.op.weight_q.spec.format.describe(),
                          "input_format": it.op.input_q.spec.format.describe(),
                          "weight_granularity": it.op.weight_q.spec.granularity.value,
                          "pow2_scales": bool(xg.pow2 and wg.pow2)})
        s_acc = xg.scale[0] * np.broadcast_to(wg.scale, (lay.n,)) * it.a      # real value of one acc unit
        later = [i for i in denses if i > idx]
        if later:
            nxt = quant_grid(items[later[0]].op.input_q, f"layer {items[later[0]].name} input", per_channel_ok=False)
            s_next, lo, hi = nxt.scale[0], nxt.lo, nxt.hi
        else:
            lo_a, hi_a = lay.acc_range()
            bound = float(np.max(np.maximum(abs(lo_a), abs(hi_a)) * np.abs(s_acc) + np.abs(it.b)))
            s_next, lo, hi = max(bound, 1e-30) / (2 ** (OUT_BITS - 1) - 1), -(2 ** (OUT_BITS - 1) - 1), 2 ** (OUT_BITS - 1) - 1
            lay.meta["out_scale"] = s_next
        nxt_item = items[idx + 1] if idx + 1 < len(items) else None
        # before an average pool: codes on a grid AVG_EXTRA_BITS finer than the mean needs
        f = nxt_item[4] ** 2 << AVG_EXTRA_BITS if isinstance(nxt_item, tuple) and nxt_item[0] == "avgpool" else 1
        if f > 1:          # an average pool follows: codes on a k*k finer grid (see the pool branch)
            lay.meta["avg_factor"] = f
        lay.mult, lay.bias, lay.shift = _fixed_point(s_acc * f / s_next, it.b * f / s_next)
        lay.out_lo, lay.out_hi = (max(lo, 0) if it.relu else lo), hi
        if f > 1:
            # no clamp before the mean (the fake-quantized model clamps the mean): the range is
            # what acc * m + b can reach, rounded
            lay.meta["pool_range"] = (lay.out_lo, lay.out_hi)
            p_lo, p_hi = lay.product_range()
            lay.out_lo = max(lay.out_lo if it.relu else p_lo >> lay.shift, p_lo >> lay.shift)
            lay.out_hi = -((-p_hi) >> lay.shift)
        lay.meta["shift_only"] = bool(np.all(np.abs(lay.mult) == 1))
        layers.append(lay)
    return layers

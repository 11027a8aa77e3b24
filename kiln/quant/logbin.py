"""Power-of-two, binary and ternary formats.

- "log": 0 and +-2^e (Miyashita et al. 2016, "Convolutional neural networks using logarithmic data
  representation"), times an outside scale;
- "binary": sign(x), optionally times alpha = mean|x| per output channel (XNOR-Net, Rastegari et al. 2016);
- "ternary": {-alpha, 0, +alpha} with threshold 0.7 * mean|x| (Ternary Weight Networks, Li & Liu 2016).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kiln.errors import KilnError
from kiln.quant.formats import FORMATS, Format, _check_bits, pass_through, preset
from kiln.quant.minifloat import pow2, quantize_scaled


@FORMATS.register("log")
@dataclass(frozen=True)
class LogFormat(Format):
    """Sign and `bits - 1` code bits: 0 and +-2^e for the 2^(bits-1) - 1 exponents e = 0, -1, ..., emin =
    -(2^(bits-1) - 2), times a scale (qmax = 1: scale = amax maps amax to 1). Rounds to the nearest power in
    the log domain, e = round(log2|y|), so 2^e and 2^(e+1) meet at 2^(e+1/2) (decided exactly by comparing
    the frexp mantissa with sqrt 2); |y| <= 2^(emin-1), where 0 is nearer than 2^emin, rounds to 0;
    |y| > 1 saturates to 1. `zero_point` is ignored."""

    name: ClassVar[str] = "log"
    bits_: int = 4

    def __post_init__(self):
        _check_bits("log", self.bits_, 2, 8)

    @property
    def bits(self) -> float:
        return float(self.bits_)

    @property
    def emin(self) -> int:
        return -(2 ** (self.bits_ - 1) - 2)

    @property
    def qmax(self) -> float:
        return 1.0

    def to_grid(self, y: torch.Tensor) -> torch.Tensor:
        """y rounded to the unscaled grid (no gradient), in y's dtype."""
        a = y.abs().to(torch.float64 if y.dtype == torch.float64 else torch.float32)
        m, k = torch.frexp(a)                     # a = m * 2^k, m in [0.5, 1)
        # 2m > sqrt 2 iff log2(a) - floor(log2 a) > 1/2; exact for float32 inputs, because no 24-bit number
        # lies between sqrt 2 and its float32 rounding (the scalar is converted to a's dtype).
        e = torch.clamp(k - 1 + (2 * m > math.sqrt(2)).to(k.dtype), self.emin, 0)
        r = pow2(e).to(a.dtype)
        r = torch.where(a <= 2.0 ** (self.emin - 1), 0.0, r)
        r = torch.where(torch.isnan(a), a, r)
        return torch.copysign(r, y.to(a.dtype)).to(y.dtype)

    def quantize(self, x, scale=None, zero_point=None):
        return quantize_scaled(x, scale, self.to_grid)

    def values(self):
        pos = pow2(torch.arange(self.emin, 1))
        return torch.cat([-pos.flip(0), torch.zeros(1, dtype=torch.float64), pos])

    def describe(self) -> str:
        return f"log{self.bits_}"


def _slice_mean(v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of v over each slice of the first dimension (the whole tensor when v has fewer than 2 dims),
    shaped to broadcast against v; with `mask`, over the masked elements only (0 where there are none)."""
    rows = v.reshape(v.shape[0] if v.dim() >= 2 else 1, -1)
    keep = torch.ones_like(rows, dtype=torch.bool) if mask is None else mask.reshape(rows.shape)
    mean = torch.where(keep, rows, 0.0).sum(1) / keep.sum(1).clamp(min=1)
    return mean.reshape([-1] + [1] * (v.dim() - 1)) if v.dim() >= 2 else mean.reshape(())


# Statistics are taken in float64: summing n copies of one float32 alpha there is exact (n < 2^29), so
# quantizing a quantized tensor gives back the same alpha, bit for bit.

@FORMATS.register("binary")
@dataclass(frozen=True)
class Binary(Format):
    """+-1 by sign (sign(0) = +1); with `alpha`, +-alpha where alpha = mean|x| over each slice of the first
    dimension (per output channel for weights; per tensor for 1-D x), as XNOR-Net's binary weights.
    Self-scaled: ignores scale. 1 bit (alpha is amortised over a channel)."""

    name: ClassVar[str] = "binary"
    scaled: ClassVar[bool] = False
    alpha: bool = False

    @property
    def bits(self) -> float:
        return 1.0

    @property
    def qmax(self) -> float:
        return 1.0

    def quantize(self, x, scale=None, zero_point=None):
        v = x.detach().to(torch.float64)
        q = torch.where(v >= 0, 1.0, -1.0).to(torch.float64)
        if self.alpha:
            q = q * _slice_mean(v.abs())
        return pass_through(x, torch.where(torch.isnan(v), v, q))

    def values(self):
        return torch.tensor([-1.0, 1.0], dtype=torch.float64)

    def describe(self) -> str:
        return "binary" + (" alpha=mean|x|" if self.alpha else "")


@FORMATS.register("ternary")
@dataclass(frozen=True)
class Ternary(Format):
    """Ternary Weight Networks: per slice of the first dimension (per tensor for 1-D x), delta =
    `threshold` * mean|x| (0.7 in the paper), and x -> sign(x) * alpha where |x| > delta, else 0, with alpha
    the mean of |x| over those elements. Self-scaled: ignores scale. Stored in 2 bits (log2 3 ~ 1.58 of
    information)."""

    name: ClassVar[str] = "ternary"
    scaled: ClassVar[bool] = False
    threshold: float = 0.7

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise KilnError(f"format ternary: threshold must be in [0, 1], got {self.threshold}")

    @property
    def bits(self) -> float:
        return 2.0

    @property
    def qmax(self) -> float:
        return 1.0

    def quantize(self, x, scale=None, zero_point=None):
        v = x.detach().to(torch.float64)
        a = v.abs()
        keep = a > self.threshold * _slice_mean(a)
        q = torch.where(keep, torch.sign(v) * _slice_mean(a, keep), 0.0)
        return pass_through(x, torch.where(torch.isnan(v), v, q))

    def values(self):
        return torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)

    def describe(self) -> str:
        return "ternary" + ("" if self.threshold == 0.7 else f" threshold={self.threshold}")


preset("log4", format="log", bits=4)
preset("log8", format="log", bits=8)
preset("binary", format="binary")
preset("binary_scaled", format="binary", alpha=True)
preset("ternary", format="ternary")

__all__ = ["Binary", "LogFormat", "Ternary"]

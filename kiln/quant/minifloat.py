"""Minifloats: binary floating point with few exponent and mantissa bits (FP8, FP6, FP4, ...).

A code with exponent field E > 0 is (-1)^s * 2^(E - bias) * 1.m, one with E = 0 is the subnormal
(-1)^s * 2^(1 - bias) * 0.m. Formats differ in what the top exponent code means (`special`):

- "ieee": inf and NaN, as IEEE 754 and OCP FP8 E5M2 (max 1.75 * 2^15 = 57344);
- "fn":   finite numbers except the single NaN pattern S.1111.111, as OCP FP8 E4M3 (max 1.75 * 2^8 = 448);
- "none": finite numbers only, as the OCP MX FP6/FP4 elements (E3M2 max 28, E2M3 max 7.5, E2M1 max 6).

Sources: OCP 8-bit Floating Point Specification (OFP8) rev 1.0 (2023) for E4M3 and E5M2;
OCP Microscaling Formats (MX) v1.0 (2023), section 5.3 (element data types), for FP6 and FP4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kiln.errors import KilnError
from kiln.quant.formats import FORMATS, Format, pass_through, preset

SPECIALS = ("ieee", "fn", "none")


def quantize_scaled(x: torch.Tensor, scale: torch.Tensor | None, to_grid) -> torch.Tensor:
    """`to_grid(x / scale) * scale` with the straight-through gradient to x / scale, so a learnt scale gets
    the LSQ-style gradient and x the identity's; `scale=None` means 1."""
    y = x if scale is None else x / scale
    q = pass_through(y, to_grid(y.detach()))
    return (q if scale is None else q * scale).to(x.dtype)


def pow2(n: torch.Tensor) -> torch.Tensor:
    """2^n for integer n in [-1022, 1023], exactly, as float64: built from the bit pattern, because exp2
    and pow in vectorised math libraries are not guaranteed to be exact."""
    return ((n.to(torch.int64) + 1023) << 52).view(torch.float64)


def round_float(y: torch.Tensor, man: int, emin: int, max_value: float, overflow: float,
                denormals: bool = True) -> torch.Tensor:
    """y rounded to the nearest float with `man` mantissa bits and smallest normal exponent `emin`, ties to
    even: the integer significand |y| / 2^(e - man), e = max(floor(log2|y|), emin), is rounded half to even
    (the even mantissa; with man = 0, a tie between two powers of two goes to the larger). Magnitudes that
    round above `max_value` become `overflow` (max_value to saturate, inf or nan); NaN stays NaN. Without
    denormals, magnitudes below 2^emin go to 0 or 2^emin, whichever is nearer (a tie goes to 0). Exact when
    y's dtype holds every step 2^(e - man), for e up to floor(log2 max_value) + 1, as a normal number."""
    a = y.abs()
    _, k = torch.frexp(a)                                 # a = f * 2^k with f in [0.5, 1): floor(log2 a) = k - 1
    emax = math.frexp(max_value)[1] - 1
    e = torch.clamp(k - 1, emin, emax + 1)                # subnormals share the smallest binade's step
    step = pow2(e - man).to(y.dtype)
    r = torch.round(a / step) * step                      # a / step is exact; torch.round is half to even
    if not denormals:
        tiny = 2.0 ** emin
        r = torch.where(a < tiny, torch.where(a > tiny / 2, tiny, 0.0), r)
    r = torch.where(r > max_value, overflow, r)
    return torch.copysign(r, y)


@FORMATS.register("minifloat")
@dataclass(frozen=True)
class MiniFloat(Format):
    """Sign, `exp` exponent bits and `man` mantissa bits (bits = 1 + exp + man), times a scale. Rounds to
    nearest, ties to even. `bias` defaults to 2^(exp-1) - 1. `denormals=False` drops the subnormals: a
    magnitude below the smallest normal goes to 0 or to the smallest normal, whichever is nearer (a tie to
    0). `saturate=True` clamps overflow (and +-inf) to +-max; `saturate=False` gives +-inf for "ieee" and
    NaN for "fn" (OFP8's non-saturating conversion); "none" has neither, so it always saturates.
    `zero_point` is ignored: minifloats are symmetric."""

    name: ClassVar[str] = "minifloat"
    exp: int = 4
    man: int = 3
    bias: int | None = None
    special: str = "fn"
    denormals: bool = True
    saturate: bool = True

    def __post_init__(self):
        where = "format minifloat"
        if self.special not in SPECIALS:
            raise KilnError(f"{where}: special must be one of {', '.join(SPECIALS)}, got {self.special!r}")
        lo = 1 if self.special == "none" else 2           # "ieee"/"fn" with one exponent bit have no normals
        if not lo <= self.exp <= 8:
            raise KilnError(f"{where}: exp must be in [{lo}, 8] for special={self.special!r}, got {self.exp}")
        if not 0 <= self.man <= 10:
            raise KilnError(f"{where}: man must be in [0, 10], got {self.man}")
        # Keep every value a normal float32 number or float32 subnormal: max <= 2^127, step >= 2^-149.
        lo, hi = self._top_code - 127, 150 - self.man
        if self.bias is not None and not lo <= self.bias <= hi:
            raise KilnError(f"{where}: bias must be in [{lo}, {hi}] for exp={self.exp}, man={self.man}, "
                            f"got {self.bias}")

    @property
    def _top_code(self) -> int:
        """The largest exponent field that holds a finite normal number."""
        full = 2 ** self.exp - 1
        return full - 1 if self.special == "ieee" or (self.special == "fn" and self.man == 0) else full

    @property
    def exponent_bias(self) -> int:
        return 2 ** (self.exp - 1) - 1 if self.bias is None else self.bias

    @property
    def emin(self) -> int:
        """The exponent of the smallest normal number."""
        return 1 - self.exponent_bias

    @property
    def emax(self) -> int:
        """The exponent of the largest finite number."""
        return self._top_code - self.exponent_bias

    @property
    def bits(self) -> float:
        return float(1 + self.exp + self.man)

    @property
    def qmax(self) -> float:
        top_mantissa = 2 ** self.man - (2 if self.special == "fn" and self.man > 0 else 1)  # fn: 1..1 is NaN
        return (1 + top_mantissa / 2 ** self.man) * 2.0 ** self.emax

    def to_grid(self, y: torch.Tensor) -> torch.Tensor:
        """y rounded to the unscaled grid (no scale, no gradient), in y's dtype."""
        # float32 holds every step 2^(e - man) exactly unless the format reaches past float32's normal
        # range (bf16-like formats); then compute in float64.
        exact32 = self.emin - self.man >= -126 and self.emax + 1 - self.man <= 127 and y.dtype != torch.float64
        overflow = self.qmax if self.saturate or self.special == "none" else (
            math.inf if self.special == "ieee" else math.nan)
        r = round_float(y.to(torch.float32 if exact32 else torch.float64), self.man, self.emin, self.qmax,
                        overflow, self.denormals)
        return r.to(y.dtype)

    def quantize(self, x, scale=None, zero_point=None):
        return quantize_scaled(x, scale, self.to_grid)

    def values(self):
        codes = torch.arange(2 ** (self.exp + self.man), dtype=torch.int64)   # the non-negative half
        field, m = codes >> self.man, codes & (2 ** self.man - 1)
        frac = m.to(torch.float64) / 2 ** self.man
        mag = torch.where(field == 0, frac, 1 + frac) * pow2(torch.clamp(field, min=1) - self.exponent_bias)
        keep = torch.ones_like(codes, dtype=torch.bool)
        if self.special == "ieee":
            keep &= field != 2 ** self.exp - 1
        elif self.special == "fn":
            keep &= (field != 2 ** self.exp - 1) | (m != 2 ** self.man - 1)
        if not self.denormals:
            keep &= (field > 0) | (m == 0)
        mag = mag[keep]
        return torch.sort(torch.cat([-mag[mag > 0], mag])).values

    def describe(self) -> str:
        text = f"fp{int(self.bits)}_e{self.exp}m{self.man}" + ("fn" if self.special == "fn" else "")
        if self.bias is not None and self.bias != 2 ** (self.exp - 1) - 1:
            text += f" bias={self.bias}"
        if not self.denormals:
            text += " no-subnormals"
        if not self.saturate and self.special != "none":
            text += " non-saturating"
        return text


# OFP8 (E4M3, E5M2); MX v1.0 section 5.3 (FP6 and FP4 elements); IEEE 754 binary16; bfloat16.
preset("fp8_e4m3", format="minifloat", exp=4, man=3, special="fn")
preset("fp8_e5m2", format="minifloat", exp=5, man=2, special="ieee")
preset("fp6_e3m2", format="minifloat", exp=3, man=2, special="none")
preset("fp6_e2m3", format="minifloat", exp=2, man=3, special="none")
preset("fp4_e2m1", format="minifloat", exp=2, man=1, special="none")
preset("fp16", format="minifloat", exp=5, man=10, special="ieee")
preset("bf16", format="minifloat", exp=8, man=7, special="ieee")

__all__ = ["MiniFloat", "SPECIALS", "pow2", "quantize_scaled", "round_float"]

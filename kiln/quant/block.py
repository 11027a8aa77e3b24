"""Block formats: each block of `block` consecutive elements along the LAST dimension shares one
power-of-two scale, computed from the block itself (the caller moves the axis it wants to the end).

- "mx": OCP Microscaling Formats (MX) v1.0 (2023): blocks of 32 elements share an E8M0 scale
  (section 5.4.1: 2^-127 to 2^127) over FP8/FP6/FP4/INT8 elements (section 5.3);
- "bfp": block floating point with integer mantissas, as MSFP (Darvish Rouhani et al., NeurIPS 2020)
  and HBFP (Drumond et al., NeurIPS 2018).

Both take the shared exponent from the block's largest magnitude (MX v1.0 section 6.3):
s = floor(log2 max|V|) - emax_elem, clamped to the scale's range, where emax_elem is the exponent of
the element type's largest value; elements V / 2^s are rounded to nearest-even and saturate.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, ClassVar

import torch

from kiln.errors import KilnError
from kiln.quant.formats import FORMATS, Format, pass_through, preset
from kiln.quant.minifloat import MiniFloat, pow2

# MX v1.0 section 5.3 and table 1. The FP elements reuse MiniFloat's rounding; emax_elem = MiniFloat.emax
# (E4M3 8, E5M2 15, E3M2 4, E2M3 2, E2M1 2).
_FP_ELEMENTS: dict[str, MiniFloat] = {
    "fp8_e4m3": MiniFloat(exp=4, man=3, special="fn"),
    "fp8_e5m2": MiniFloat(exp=5, man=2, special="ieee"),
    "fp6_e3m2": MiniFloat(exp=3, man=2, special="none"),
    "fp6_e2m3": MiniFloat(exp=2, man=3, special="none"),
    "fp4_e2m1": MiniFloat(exp=2, man=1, special="none"),
}
ELEMENTS = ("int8", *_FP_ELEMENTS)


def _int_grid(v: torch.Tensor, man: int) -> torch.Tensor:
    """v rounded to k / 2^(man-2) with k a `man`-bit signed integer in the narrow range
    [-(2^(man-1)-1), 2^(man-1)-1] (values in (-2, 2)), half to even, saturating."""
    unit, top = 2.0 ** (man - 2), 2 ** (man - 1) - 1
    return torch.clamp(torch.round(v * unit), -top, top) / unit


def _blocks(fmt: str, x: torch.Tensor, block: int) -> torch.Tensor:
    """x (detached) as rows of `block` elements, in float32 (float64 for float64 x)."""
    n = x.shape[-1] if x.dim() else 1
    if n % block:
        raise KilnError(f"format {fmt}: block size {block} does not divide the last dimension ({n}); "
                        f"move an axis whose length it divides to the end, or change block")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.detach().reshape(-1, block).to(dtype)


def _shared_scale_quantize(rows: torch.Tensor, emax_elem: int, lo: int, hi: int,
                           to_grid: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Each row scaled by 2^-s, s = floor(log2 max|row|) - emax_elem clamped to [lo, hi], rounded to the
    element grid and scaled back. An all-zero row stays zero (its elements are 0 whatever s is); a row
    whose max is inf or NaN comes out NaN, as with the E8M0 NaN scale (0xFF) that torchao and microxcaling
    give such a block."""
    amax = rows.abs().amax(dim=-1, keepdim=True)
    _, k = torch.frexp(amax)                                  # floor(log2 amax) = k - 1 for amax > 0
    s = torch.clamp(k - 1 - emax_elem, lo, hi)
    q = to_grid(rows * pow2(-s).to(rows.dtype)) * pow2(s).to(rows.dtype)   # power-of-two scaling is exact
    return torch.where(torch.isfinite(amax), q, torch.nan)


def _check(fmt: str, key: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise KilnError(f"format {fmt}: {key} must be in [{lo}, {hi}], got {value}")


@FORMATS.register("mx")
@dataclass(frozen=True)
class MXFormat(Format):
    """OCP MX v1.0: `block` elements (32 in the spec) share an E8M0 scale X = 2^s, s = floor(log2 max|V|) -
    emax_elem clamped to [-127, 127]; elements V / X round to the element type (nearest even, saturating at
    its max). bits = element bits + 8 / block. INT8 elements are k / 64 (two's complement with an implicit
    2^-6, section 5.3); the spec's table also lets code 0x80 mean -2, but, like Microsoft's reference
    implementation (microxcaling, mx/formats.py: int8 max_norm = 127/64, clamped symmetrically), we use
    the symmetric range k in [-127, 127], so zero is the centre and negation is exact."""

    name: ClassVar[str] = "mx"
    scaled: ClassVar[bool] = False
    element: str = "fp8_e4m3"
    block: int = 32

    def __post_init__(self):
        if self.element not in ELEMENTS:
            raise KilnError(f"format mx: element must be one of {', '.join(ELEMENTS)}, got {self.element!r}")
        _check("mx", "block", self.block, 1, 4096)

    @property
    def _fp(self) -> MiniFloat | None:
        return _FP_ELEMENTS.get(self.element)

    @property
    def bits(self) -> float:
        return (8.0 if self._fp is None else self._fp.bits) + 8 / self.block

    @property
    def qmax(self) -> float:
        return 127 / 64 if self._fp is None else self._fp.qmax

    def quantize(self, x, scale=None, zero_point=None):
        rows = _blocks("mx", x, self.block)
        fp = self._fp
        grid = partial(_int_grid, man=8) if fp is None else fp.to_grid
        q = _shared_scale_quantize(rows, 0 if fp is None else fp.emax, -127, 127, grid)
        return pass_through(x, q.reshape(x.shape))

    def values(self):
        if self._fp is None:
            return torch.arange(-127, 128, dtype=torch.float64) / 64
        return self._fp.values()

    def describe(self) -> str:
        return f"mx{self.element}" + ("" if self.block == 32 else f" block={self.block}")


@FORMATS.register("bfp")
@dataclass(frozen=True)
class BlockFloat(Format):
    """Block floating point: `block` elements share an `exp`-bit exponent s = floor(log2 max|x|), clamped to
    [-(2^(exp-1)-1), 2^(exp-1)-1] (E8M0's range for exp = 8), and each element is a `man`-bit signed
    integer mantissa k (sign included, narrow range |k| <= 2^(man-1)-1): x ~ k * 2^(s - man + 2), so the
    block's largest element uses the top mantissa bit. Rounding is half to even; mantissas saturate.
    bits = man + exp / block. With man = 8, block = 32 this is exactly MXINT8."""

    name: ClassVar[str] = "bfp"
    scaled: ClassVar[bool] = False
    man: int = 8
    block: int = 16
    exp: int = 8

    def __post_init__(self):
        _check("bfp", "man", self.man, 2, 16)
        _check("bfp", "block", self.block, 1, 4096)
        _check("bfp", "exp", self.exp, 1, 8)

    @property
    def bits(self) -> float:
        return self.man + self.exp / self.block

    @property
    def qmax(self) -> float:
        return (2 ** (self.man - 1) - 1) / 2 ** (self.man - 2)

    def quantize(self, x, scale=None, zero_point=None):
        rows = _blocks("bfp", x, self.block)
        top = 2 ** (self.exp - 1) - 1
        q = _shared_scale_quantize(rows, 0, -top, top, partial(_int_grid, man=self.man))
        return pass_through(x, q.reshape(x.shape))

    def values(self):
        top = 2 ** (self.man - 1) - 1
        return torch.arange(-top, top + 1, dtype=torch.float64) / 2 ** (self.man - 2)

    def describe(self) -> str:
        return f"bfp{self.man} block={self.block}" + ("" if self.exp == 8 else f" exp={self.exp}")


# MX v1.0 table 1: the concrete MX formats (MXFP8, MXFP6, MXFP4, MXINT8), all with k = 32.
preset("mxint8", format="mx", element="int8")
preset("mxfp8", format="mx", element="fp8_e4m3")
preset("mxfp8_e4m3", format="mx", element="fp8_e4m3")
preset("mxfp8_e5m2", format="mx", element="fp8_e5m2")
preset("mxfp6", format="mx", element="fp6_e3m2")
preset("mxfp6_e3m2", format="mx", element="fp6_e3m2")
preset("mxfp6_e2m3", format="mx", element="fp6_e2m3")
preset("mxfp4", format="mx", element="fp4_e2m1")
for _m in (8, 6, 4):
    preset(f"bfp{_m}", format="bfp", man=_m, block=16)

__all__ = ["ELEMENTS", "BlockFloat", "MXFormat"]

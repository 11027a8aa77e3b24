"""Number formats: one quantizer function per format, each with a straight-through estimator.

A `Format` rounds a tensor to the values it can represent and returns them dequantized (fake
quantization), so the result runs through ordinary fp32 kernels and gradients flow back to
the input as if the rounding were the identity (Bengio et al. 2013's straight-through
estimator). Two kinds:

- *scaled* formats (integer, minifloat, log) round `x / scale` to a fixed grid of values; the
  scale comes from outside (weight statistics or calibration, see `kiln.quant.quantizer`) and
  `qmin`/`qmax` say which range of the grid a scale should map the data onto;
- *self-scaled* formats (MX, block floating point, binary, ternary, fixed point) compute their
  own scales from the tensor, per block or per channel, and ignore any given scale.

Formats are frozen dataclasses registered by name (`FORMATS`); `parse_format` builds one from
a TOML table or a preset name such as "int8", "fp8_e4m3" or "mxfp4".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kiln.config import from_dict
from kiln.errors import KilnError
from kiln.registry import Registry

# the other families register themselves (and their presets) when their module is imported
FORMATS: Registry[type["Format"]] = Registry("number format", ("kiln.quant.block", "kiln.quant.logbin",
                                                              "kiln.quant.minifloat"))
PRESETS: dict[str, dict[str, Any]] = {}


class _PassThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q):
        return q

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def pass_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`q` (cast to x's dtype) forward, the identity's gradient to `x` backward. Unlike
    `x + (q - x).detach()`, the forward value is exactly q even when |x| >> |q| (1e30
    saturating to 448 would come out as 0 there: 1e30 + (448 - 1e30) rounds to 0 in float32)."""
    return _PassThrough.apply(x, q.to(x.dtype))


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even, with the straight-through gradient (LSQ's round_pass)."""
    return pass_through(x, torch.round(x))


@dataclass(frozen=True)
class Format:
    """Base class: subclasses set `name`, `scaled` and implement `quantize`, `bits` and `values`."""

    name: ClassVar[str] = ""
    scaled: ClassVar[bool] = True

    def quantize(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                 zero_point: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def bits(self) -> float:
        """Storage bits per element, shared scales amortised over their block."""
        raise NotImplementedError

    @property
    def qmax(self) -> float:
        """The largest representable value of the unscaled grid (what a tensor's max maps to)."""
        raise NotImplementedError

    @property
    def qmin(self) -> float:
        """The smallest (most negative) representable value of the unscaled grid."""
        return -self.qmax

    def values(self) -> torch.Tensor:
        """Every representable value of the unscaled element grid, sorted (for tests and docs)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def _check_bits(fmt: str, bits: int, lo: int, hi: int) -> None:
    if not lo <= bits <= hi:
        raise KilnError(f"format {fmt}: bits must be in [{lo}, {hi}], got {bits}")


@FORMATS.register("int")
@dataclass(frozen=True)
class IntFormat(Format):
    """Two's-complement or unsigned integers of `bits` bits times a scale (and a zero point when
    asymmetric). Signed symmetric formats use the narrow range [-(2^(b-1)-1), 2^(b-1)-1] so that
    zero sits in the middle (as TensorRT and torchao do); signed asymmetric and unsigned use the
    full range. Rounding is half to even; values beyond the range saturate."""

    name: ClassVar[str] = "int"
    bits_: int = 8
    signed: bool = True
    symmetric: bool = True

    def __post_init__(self):
        _check_bits("int", self.bits_, 2, 16)

    @property
    def bits(self) -> float:
        return float(self.bits_)

    @property
    def qmin(self) -> float:
        if not self.signed:
            return 0.0
        return float(-(2 ** (self.bits_ - 1)) + (1 if self.symmetric else 0))

    @property
    def qmax(self) -> float:
        return float(2 ** (self.bits_ - 1) - 1 if self.signed else 2 ** self.bits_ - 1)

    def quantize(self, x, scale=None, zero_point=None):
        if scale is None:
            raise ValueError("the int format needs a scale")
        q = round_ste(x / scale)
        if zero_point is not None:
            q = q + zero_point
        q = torch.clamp(q, self.qmin, self.qmax)
        return (q - zero_point if zero_point is not None else q) * scale

    def values(self):
        return torch.arange(int(self.qmin), int(self.qmax) + 1, dtype=torch.float64)

    def describe(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits_}{'' if self.symmetric else ' asym'}"


@FORMATS.register("fixed")
@dataclass(frozen=True)
class FixedPoint(Format):
    """Signed fixed point Q(width - frac).(frac): two's-complement integers of `width` bits with
    the binary point `frac` bits from the right, i.e. k * 2^-frac for k in [-2^(w-1), 2^(w-1)-1].
    The scale is part of the format, so it ignores any given one (MASE's fixed-point type)."""

    name: ClassVar[str] = "fixed"
    scaled: ClassVar[bool] = False
    width: int = 8
    frac: int = 4

    def __post_init__(self):
        _check_bits("fixed", self.width, 2, 32)
        if not 0 <= self.frac <= self.width + 16:
            raise KilnError(f"format fixed: frac must be in [0, {self.width + 16}], got {self.frac}")

    @property
    def bits(self) -> float:
        return float(self.width)

    @property
    def qmax(self) -> float:
        return (2 ** (self.width - 1) - 1) * 2.0 ** -self.frac

    @property
    def qmin(self) -> float:
        return -(2 ** (self.width - 1)) * 2.0 ** -self.frac

    def quantize(self, x, scale=None, zero_point=None):
        step = 2.0 ** -self.frac
        q = torch.clamp(round_ste(x / step), -(2 ** (self.width - 1)), 2 ** (self.width - 1) - 1)
        return q * step

    def values(self):
        return torch.arange(-(2 ** (self.width - 1)), 2 ** (self.width - 1), dtype=torch.float64) * 2.0 ** -self.frac

    def describe(self) -> str:
        return f"fixed<{self.width},{self.frac}>"


def preset(name: str, **table: Any) -> None:
    """Register a named preset: `parse_format("fp8_e4m3")` is `parse_format({**table})`."""
    PRESETS[name] = table


for _b in range(2, 17):
    preset(f"int{_b}", format="int", bits=_b)
    preset(f"uint{_b}", format="int", bits=_b, signed=False)


def parse_format(spec: str | dict[str, Any], where: str = "format") -> Format:
    """A Format from a preset name or a table {format = NAME, ...fields}; `bits` is the field
    name users write for every family (stored as `bits_` where the dataclass needs a property)."""
    FORMATS.load()   # presets of the other families too
    if isinstance(spec, str):
        if spec not in PRESETS:
            known = sorted(PRESETS, key=lambda n: (n.rstrip("0123456789"), len(n), n))
            raise KilnError(f"{where}: unknown format {spec!r}; presets: {', '.join(known)}; "
                            f"families: {', '.join(FORMATS.names())}")
        spec = PRESETS[spec]
    if not isinstance(spec, dict):
        raise KilnError(f"{where}: expected a format name or a table, got {spec!r}")
    table = dict(spec)
    if "format" not in table:
        raise KilnError(f"{where}: missing key 'format'; families: {', '.join(FORMATS.names())}")
    name = table.pop("format")
    if not isinstance(name, str):
        raise KilnError(f"{where}: format must be a name, got {name!r}; families: {', '.join(FORMATS.names())}")
    if name in PRESETS:                      # a preset with overrides: {format = "mxfp4", block = 16}
        table = {**{k: v for k, v in PRESETS[name].items() if k != "format"}, **table}
        name = PRESETS[name]["format"]
    if name not in FORMATS:
        raise KilnError(f"{where}: unknown format {name!r}; families: {', '.join(FORMATS.names())}; "
                        f"presets: {', '.join(sorted(PRESETS))}")
    cls = FORMATS.get(name)
    if "bits" in table and "bits_" in {f for f in cls.__dataclass_fields__}:
        table["bits_"] = table.pop("bits")
    return from_dict(cls, table, f"{where} ({name})")


__all__ = ["FORMATS", "PRESETS", "Format", "IntFormat", "FixedPoint", "parse_format", "preset", "pass_through",
           "round_ste"]

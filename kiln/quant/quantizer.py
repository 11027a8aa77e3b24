"""A Quantizer: one tensor's format plus how its scale is found (granularity, calibration).

The format (kiln.quant.formats) decides which values exist; the quantizer decides how a tensor
maps onto them: one scale for the tensor, one per channel, one per group of `group_size`
elements along the reduction axis, or one per token computed on the fly (dynamic). Weights
get their scale from the weight itself; activations from calibration batches (min-max, a
percentile of |x|, or the clipping range that minimises the quantization MSE), or dynamically.
With `learnable`, the scale is an nn.Parameter trained with LSQ's gradient (Esser et al. 2020).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.quant.formats import Format, IntFormat, parse_format


class Granularity(enum.Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"
    TOKEN = "token"        # activations only: one scale per row, computed at run time


class Calib(enum.Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


QUANTIZER_KEYS = ("granularity", "group_size", "calib", "percentile", "learnable", "dynamic")
_SAMPLES_PER_BATCH = 1 << 15     # |x| values kept per calibration batch for percentile/MSE


def _enum(cls: type[enum.Enum], value: Any, where: str) -> enum.Enum:
    try:
        return cls(value)
    except ValueError:
        raise KilnError(f"{where}: {cls.__name__.lower()} must be one of "
                        f"{', '.join(m.value for m in cls)}, got {value!r}") from None


@dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized: a format and the way its scale is chosen."""

    format: Format = field(default_factory=IntFormat)
    granularity: Granularity = Granularity.TENSOR
    group_size: int = 128
    calib: Calib = Calib.MINMAX
    percentile: float = 99.99
    learnable: bool = False
    dynamic: bool = False

    @classmethod
    def parse(cls, table: str | dict[str, Any], where: str, role: str) -> "QSpec":
        """From a preset name ("int8") or a table mixing format keys and quantizer keys."""
        if isinstance(table, str):
            table = {"format": table}
        if not isinstance(table, dict):
            raise KilnError(f"{where}: needs a format name or a table, got {table!r}")
        fmt_keys = {k: v for k, v in table.items() if k not in QUANTIZER_KEYS}
        q = {k: v for k, v in table.items() if k in QUANTIZER_KEYS}
        default_gran = "channel" if role == "weight" else "tensor"
        spec = cls(format=parse_format(fmt_keys.get("format") if set(fmt_keys) == {"format"} else fmt_keys, where),
                   granularity=_enum(Granularity, q.get("granularity", default_gran), where),
                   group_size=int(q.get("group_size", 128)),
                   calib=_enum(Calib, q.get("calib", "minmax"), where),
                   percentile=float(q.get("percentile", 99.99)),
                   learnable=bool(q.get("learnable", False)), dynamic=bool(q.get("dynamic", False)))
        spec.check(where, role)
        return spec

    def check(self, where: str, role: str) -> None:
        if self.group_size < 1:
            raise KilnError(f"{where}: group_size must be >= 1, got {self.group_size}")
        if not 50.0 < self.percentile <= 100.0:
            raise KilnError(f"{where}: percentile must be in (50, 100], got {self.percentile}")
        if role == "weight" and self.granularity is Granularity.TOKEN:
            raise KilnError(f"{where}: granularity 'token' is for activations; weights take tensor, channel or group")
        if self.learnable and not isinstance(self.format, IntFormat):
            raise KilnError(f"{where}: learnable (LSQ) scales need format 'int', got {self.format.name!r}")

    def to_table(self) -> dict[str, Any]:
        from dataclasses import asdict

        fmt = {("bits" if k == "bits_" else k): v for k, v in asdict(self.format).items()}
        return {"format": self.format.name, **fmt, "granularity": self.granularity.value,
                "group_size": self.group_size, "calib": self.calib.value, "percentile": self.percentile,
                "learnable": self.learnable, "dynamic": self.dynamic}

    @property
    def bits(self) -> float:
        return self.format.bits

    @property
    def runtime_scale(self) -> bool:
        """Scales computed from each tensor as it arrives: asked for, or per token (which
        only exist at run time)."""
        return self.dynamic or self.granularity is Granularity.TOKEN


@dataclass(frozen=True)
class IntGrid:
    """A quantizer's values as an integer kernel sees them: clamp(round(x / scale), qmin, qmax)
    times scale, symmetric (no zero point). `scale` is None where it is computed from each
    tensor as it arrives (dynamic, per token); otherwise it is the calibrated scale, shaped to
    broadcast against the tensor (per channel: (out, 1) for a Linear's weight)."""

    bits: int
    qmin: int
    qmax: int
    granularity: Granularity
    scale: torch.Tensor | None


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x in the forward pass, its gradient times g in the backward (LSQ's gradient scaling)."""
    return (x - x * g).detach() + x * g


class Quantizer(nn.Module):
    """Fake-quantizes one tensor role (weight, input or output) of one wrapped operator.

    `axis` is the reduction axis of the tensor (the one a matmul sums over): per-group scales
    and block formats run along it; a weight's channels are its dim 0, an activation's channels
    are the reduction axis; per-token scales cover everything but it.
    """

    def __init__(self, spec: QSpec, role: str, axis: int, shape: tuple[int, ...] | None, where: str):
        super().__init__()
        self.spec, self.role, self.axis, self.where = spec, role, axis, where
        self.calibrating = False
        self._stats: list[torch.Tensor] = []
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None
        scale_shape = self._scale_shape(shape) if shape is not None else None
        if spec.format.scaled and not spec.runtime_scale:
            init = torch.ones(scale_shape or (1,))
            if spec.learnable:
                self.scale = nn.Parameter(init)
            else:
                self.register_buffer("scale", init)
            asym = isinstance(spec.format, IntFormat) and not spec.format.symmetric
            self.register_buffer("zero_point", torch.zeros_like(init) if asym else None)
            # saved with the scales, so a reloaded quantizer knows it was calibrated; forward
            # reads the Python mirror `calibrated` instead: a branch on a tensor would be a
            # data-dependent guard in torch.export and a graph break in torch.compile
            self.register_buffer("ready", torch.tensor(False))
        self.calibrated = False

    # -- shapes --------------------------------------------------------------------------------
    def _scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the scale tensor that broadcasts against the (grouped) tensor."""
        g = self.spec.granularity
        if g is Granularity.TENSOR or g is Granularity.TOKEN:
            return (1,)
        if g is Granularity.CHANNEL:
            ch = 0 if self.role == "weight" else self.axis % len(shape)
            return tuple(s if i == ch else 1 for i, s in enumerate(shape))
        grouped = self._grouped_shape(shape)
        return tuple(1 if i == len(grouped) - 1 else s for i, s in enumerate(grouped)) if self.role == "weight" \
            else (grouped[-2], 1)

    def _grouped_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Weights (out, ...) -> (out, n_groups, group); activations -> (..., n_groups, group)
        with the reduction axis moved last."""
        n = math.prod(shape[1:]) if self.role == "weight" else shape[self.axis % len(shape)]
        gs = self.spec.group_size
        if n % gs:
            raise KilnError(f"{self.where}: group_size {gs} does not divide the reduction dimension {n}")
        if self.role == "weight":
            return (shape[0], n // gs, gs)
        return (n // gs, gs)

    def _to_groups(self, x: torch.Tensor) -> torch.Tensor:
        if self.role == "weight":
            return x.reshape(x.shape[0], -1, self.spec.group_size)
        x = x.movedim(self.axis, -1)
        return x.reshape(*x.shape[:-1], -1, self.spec.group_size)

    def _from_groups(self, q: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.role == "weight":
            return q.reshape(like.shape)
        moved = like.movedim(self.axis, -1)
        return q.reshape(moved.shape).movedim(-1, self.axis)

    # -- ranges --------------------------------------------------------------------------------
    def _reduce_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        """The dims a scale is shared over, for x laid out as the scale expects."""
        g = self.spec.granularity
        if g is Granularity.TENSOR:
            return tuple(range(x.dim()))
        if g is Granularity.GROUP:
            return (x.dim() - 1,) if self.role == "weight" else tuple(i for i in range(x.dim()) if i != x.dim() - 2)
        if g is Granularity.TOKEN:
            return (self.axis % x.dim(),)
        ch = 0 if self.role == "weight" else self.axis % x.dim()
        return tuple(i for i in range(x.dim()) if i != ch)

    def _minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = self._reduce_dims(x)
        return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)

    def _scale_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        fmt = self.spec.format
        tiny = torch.finfo(torch.float32).tiny
        if isinstance(fmt, IntFormat) and not fmt.symmetric:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            scale = ((hi - lo) / (fmt.qmax - fmt.qmin)).clamp(min=tiny)
            return scale, torch.round(fmt.qmin - lo / scale).clamp(fmt.qmin, fmt.qmax)
        amax = torch.maximum(lo.abs(), hi.abs()) if fmt.qmin < 0 else hi.clamp(min=0)
        return (amax / fmt.qmax).clamp(min=tiny), None

    def _search_mse(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
        """The clipping ratio in [0.2, 1] of the min-max range with the smallest squared error,
        per scale (grid search of 80 ratios, as NNCF/AdaRound-style MSE range setting does)."""
        best, best_err = None, None
        dims = self._reduce_dims(x)
        for r in torch.linspace(0.2, 1.0, 80):
            scale, zp = self._scale_from_range(lo * r, hi * r)
            err = (self.spec.format.quantize(x, scale, zp) - x).pow(2).sum(dim=dims, keepdim=True)
            if best is None:
                best, best_err = (scale, zp), err
            else:
                better = err < best_err
                best = (torch.where(better, scale, best[0]),
                        None if zp is None else torch.where(better, zp, best[1]))
                best_err = torch.minimum(err, best_err)
        return best

    def _percentile_range(self, x: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """The (100 - p)th and pth percentiles of x per scale (rows = one scale's elements)."""
        g = self.spec.granularity
        rows = x.reshape(-1, x.shape[-1]) if g is Granularity.GROUP else \
            x.reshape(x.shape[0], -1) if g is Granularity.CHANNEL else x.reshape(1, -1)
        if rows.shape[1] > 1 << 22:     # torch.quantile's input limit; a seeded subsample
            rows = rows[:, torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(0))[:1 << 22]]
        q = torch.tensor([1 - self.spec.percentile / 100, self.spec.percentile / 100])
        lo, hi = torch.quantile(rows.float(), q, dim=1)
        return lo.reshape(shape).clamp(max=0), hi.reshape(shape).clamp(min=0)

    def _fit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale (and zero point) for a tensor laid out as its scale expects."""
        lo, hi = self._minmax(x)
        if self.spec.calib is Calib.PERCENTILE:
            lo, hi = self._percentile_range(x, lo.shape)
        if self.spec.calib is Calib.MSE:
            return self._search_mse(x, lo, hi)
        return self._scale_from_range(lo, hi)

    # -- calibration -------------------------------------------------------------------------
    def init_from(self, w: torch.Tensor) -> None:
        """Weights: set the scale from the tensor itself."""
        if not self.spec.format.scaled or self.spec.runtime_scale:
            return
        x = self._to_groups(w.detach()) if self.spec.granularity is Granularity.GROUP else w.detach()
        scale, zp = self._fit(x)
        self._store(scale, zp)

    def _store(self, scale: torch.Tensor, zp: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.scale.data = scale.reshape(self.scale.shape).to(self.scale.dtype).clone()
            if zp is not None:
                self.zero_point = zp.reshape(self.scale.shape).clone()
            self.ready.fill_(True)
        self.calibrated = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        ready = getattr(self, "ready", None)
        self.calibrated = ready is not None and bool(ready)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.spec.granularity is Granularity.GROUP:
            x = self._to_groups(x)
        lo, hi = self._minmax(x)
        if self.spec.granularity is Granularity.GROUP:     # one range per group across rows
            lo = lo.reshape(-1, *lo.shape[-2:]).amin(0)
            hi = hi.reshape(-1, *hi.shape[-2:]).amax(0)
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        if self.spec.calib is not Calib.MINMAX:
            if self.spec.granularity is not Granularity.TENSOR:
                raise KilnError(f"{self.where}: calib {self.spec.calib.value!r} for activations needs "
                                "granularity 'tensor' (min-max works for every granularity)")
            flat = x.reshape(-1)
            if flat.numel() > _SAMPLES_PER_BATCH:
                idx = torch.randint(0, flat.numel(), (_SAMPLES_PER_BATCH,), generator=torch.Generator().manual_seed(len(self._stats)))
                flat = flat[idx]
            self._stats.append(flat)

    def finish_calibration(self) -> None:
        self.calibrating = False
        if not self.spec.format.scaled or self.spec.runtime_scale or self.role == "weight":
            return
        if self._lo is None:
            raise KilnError(f"{self.where}: saw no calibration data (the module never ran)")
        if self.spec.calib is Calib.MINMAX:
            scale, zp = self._scale_from_range(self._lo, self._hi)
        else:
            scale, zp = self._fit(torch.cat(self._stats).reshape(-1))
        self._store(scale, zp)
        self._stats, self._lo, self._hi = [], None, None

    def integer_grid(self) -> IntGrid | None:
        """The integer grid this quantizer rounds onto, for lowering it to integer kernels;
        None for other formats, asymmetric or unsigned integers, and uncalibrated scales."""
        fmt = self.spec.format
        if not isinstance(fmt, IntFormat) or not fmt.signed or not fmt.symmetric:
            return None
        if self.spec.runtime_scale:
            scale = None
        elif self.calibrated:
            scale = self.scale.detach()
        else:
            return None
        return IntGrid(fmt.bits_, int(fmt.qmin), int(fmt.qmax), self.spec.granularity, scale)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.spec.format
        if self.calibrating:
            self.observe(x)
            return x
        if not fmt.scaled:
            return self._self_scaled(x)
        grouped = self.spec.granularity is Granularity.GROUP
        xs = self._to_groups(x) if grouped else x
        if self.spec.runtime_scale or (self.role == "weight" and self.training and not self.spec.learnable):
            scale, zp = self._fit(xs.detach()) if self.role == "weight" else self._scale_from_range(*self._minmax(xs.detach()))
        else:
            if not self.calibrated:
                raise KilnError(f"{self.where}: {self.role} quantizer is not calibrated: run calibration batches first")
            scale, zp = self.scale, self.zero_point
            if self.spec.learnable:
                scale = _grad_scale(scale, 1.0 / math.sqrt(xs.numel() / scale.numel() * fmt.qmax))
            if grouped and self.role != "weight":
                scale = scale.reshape(scale.shape[-2:])
        q = fmt.quantize(xs, scale, zp)
        return self._from_groups(q, x) if grouped else q

    def _self_scaled(self, x: torch.Tensor) -> torch.Tensor:
        """Block formats block the reduction axis; binary/ternary scale per dim-0 slice."""
        try:
            return self._self_scaled_unchecked(x)
        except KilnError as exc:     # name the tensor: the format alone cannot
            raise KilnError(f"{self.where}: {str(exc).split('; move an axis')[0]}") from None

    def _self_scaled_unchecked(self, x: torch.Tensor) -> torch.Tensor:
        if self.role == "weight":
            flat = x.reshape(x.shape[0], -1)
            return self.spec.format.quantize(flat).reshape(x.shape)
        return self.spec.format.quantize(x.movedim(self.axis, -1)).movedim(-1, self.axis)

    def extra_repr(self) -> str:
        return f"{self.role}: {self.spec.format.describe()} {self.spec.granularity.value}" + \
            (" dynamic" if self.spec.runtime_scale else "") + (" lsq" if self.spec.learnable else "")


__all__ = ["QSpec", "Quantizer", "IntGrid", "Granularity", "Calib", "QUANTIZER_KEYS"]

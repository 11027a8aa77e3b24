"""Compressed client updates: the update (local model minus global model) in a kiln.quant format
or as its top-k entries, packed into the arrays that travel in the reply message.

A quantized tensor travels as its element codes packed at ceil(log2(#grid values)) bits each
(int8: 255 values -> 8 bits; int4: 15 -> 4; fp8_e4m3: 8; mxfp4's E2M1 elements: 4) plus its
scales: one float32 per tensor for scaled formats (int, minifloat: max|u| maps to the grid's
largest value, as a symmetric per-tensor weight quantizer does), one int8 exponent per block
of 32 for MX (OCP MX v1.0's E8M0 shared scale). `decode(encode(u))` equals kiln's own fake
quantization `fmt.quantize(u, scale)` exactly (tests/test_federated.py checks it), so the
server adds to the global model exactly the values kiln's quantizer produces.
Top-k keeps the ceil(fraction * n) entries of largest magnitude of each tensor: int32 indices
and float32 values. Error feedback (Seide et al. 2014; Karimireddy et al. 2019, EF-SGD) adds
what compression dropped last round to the next round's update.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.quant.formats import Format, parse_format

NONE, TOPK = "none", "topk"
SEP = "|"   # names in the reply: "<parameter>|codes", "<parameter>|scale", ...


def check_format(name: str) -> Format | None:
    """None for `none`/`topk`, else the kiln.quant format (an unknown name lists the presets)."""
    if name in (NONE, TOPK):
        return None
    fmt = parse_format(name, "compression.format")
    if len(fmt.values()) > 2 ** 16:
        raise KilnError(f"compression.format {name} has {len(fmt.values())} values: codes of more than 16 bits "
                        f"are no compression (use none)")
    return fmt


def _code_bits(grid: torch.Tensor) -> int:
    return max(1, math.ceil(math.log2(len(grid))))


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (< 2^bits) as a little-endian bit stream of bytes."""
    planes = ((codes[:, None].astype(np.uint32) >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.ravel(), bitorder="little")


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    planes = np.unpackbits(packed, bitorder="little")[:n * bits].reshape(n, bits).astype(np.int64)
    return planes @ (1 << np.arange(bits, dtype=np.int64))


def _nearest(grid: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Index of the grid value nearest each v (v already on the grid, up to float rounding)."""
    mid = (grid[1:] + grid[:-1]) / 2
    return torch.searchsorted(mid, v.to(grid.dtype).contiguous())


def _is_mx(fmt: Format) -> bool:
    return fmt.name == "mx"


def _mx_exponents(fmt, rows: torch.Tensor) -> torch.Tensor:
    """MX's shared exponent per block, s = floor(log2 max|row|) - emax_elem in [-127, 127]
    (kiln.quant.block._shared_scale_quantize's rule)."""
    emax = 0 if fmt._fp is None else fmt._fp.emax   # the element type's emax: MX v1.0 table 1
    _, k = torch.frexp(rows.abs().amax(dim=-1))
    return torch.clamp(k - 1 - emax, -127, 127)


def encode_tensor(u: torch.Tensor, fmt: Format) -> dict[str, np.ndarray]:
    """The wire form of one update tensor in `fmt`."""
    flat = u.detach().reshape(-1).float()
    grid = fmt.values()
    if _is_mx(fmt):
        pad = (-len(flat)) % fmt.block
        rows = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, fmt.block)
        s = _mx_exponents(fmt, rows)
        q = fmt.quantize(rows.reshape(-1)).reshape(rows.shape).detach()
        codes = _nearest(grid, q * torch.pow(2.0, -s.double()).unsqueeze(1))
        return {"codes": pack(codes.reshape(-1).numpy(), _code_bits(grid)), "exp": s.numpy().astype(np.int8)}
    amax = float(flat.abs().max()) if len(flat) else 0.0
    scale = torch.tensor(amax / fmt.qmax if amax > 0 else 1.0, dtype=torch.float32)
    q = fmt.quantize(flat, scale).detach()
    codes = _nearest(grid, q.double() / scale.double())
    return {"codes": pack(codes.numpy(), _code_bits(grid)), "scale": scale.reshape(1).numpy()}


def decode_tensor(parts: dict[str, np.ndarray], fmt: Format, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    grid = fmt.values()
    if _is_mx(fmt):
        s = torch.from_numpy(parts["exp"].astype(np.int64))
        count = len(s) * fmt.block
        codes = torch.from_numpy(unpack(parts["codes"], _code_bits(grid), count)).reshape(-1, fmt.block)
        rows = grid[codes].float() * torch.pow(2.0, s.float()).unsqueeze(1)   # power-of-two scaling is exact
        return rows.reshape(-1)[:n].reshape(shape)
    codes = torch.from_numpy(unpack(parts["codes"], _code_bits(grid), n))
    return (grid[codes].float() * torch.from_numpy(parts["scale"]).float()).reshape(shape)


def topk_encode(u: torch.Tensor, fraction: float) -> dict[str, np.ndarray]:
    flat = u.detach().reshape(-1).float()
    k = max(1, math.ceil(fraction * len(flat)))
    idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    return {"idx": idx.numpy().astype(np.int32), "val": flat[idx].numpy()}


def topk_decode(parts: dict[str, np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.zeros(math.prod(shape))
    out[torch.from_numpy(parts["idx"].astype(np.int64))] = torch.from_numpy(parts["val"])
    return out.reshape(shape)


def encode(update: dict[str, torch.Tensor], name: str, fraction: float) -> dict[str, np.ndarray]:
    """Every tensor of an update in its wire form, flattened to `<param>|<part>` arrays."""
    fmt = check_format(name)
    out = {}
    for key, u in update.items():
        parts = topk_encode(u, fraction) if fmt is None else encode_tensor(u, fmt)
        out |= {f"{key}{SEP}{p}": v for p, v in parts.items()}
    return out


def decode(arrays: dict[str, np.ndarray], name: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The update `encode` packed, as float tensors of the given shapes."""
    fmt = check_format(name)
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for full, v in arrays.items():
        key, _, part = full.rpartition(SEP)
        grouped.setdefault(key, {})[part] = v
    missing = set(shapes) - set(grouped)
    if missing:
        raise KilnError(f"a compressed update lacks parameter {sorted(missing)[0]}")
    return {k: topk_decode(grouped[k], s) if fmt is None else decode_tensor(grouped[k], fmt, s)
            for k, s in shapes.items()}


def compress_update(update: dict[str, torch.Tensor], name: str, fraction: float,
                    residual: dict[str, torch.Tensor] | None) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """(wire arrays, new residual): with a residual (error feedback) the update sent is
    update + residual and the new residual is what its compression dropped."""
    if residual:
        update = {k: u + residual[k] for k, u in update.items()}
    wire = encode(update, name, fraction)
    sent = decode(wire, name, {k: tuple(u.shape) for k, u in update.items()})
    return wire, {k: update[k] - sent[k] for k in update}

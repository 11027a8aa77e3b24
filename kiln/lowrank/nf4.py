"""NF4: the 4-bit NormalFloat storage of QLoRA's frozen base weights (Dettmers et al. 2023,
arXiv 2305.14314), with blockwise absmax scales and double quantization of those scales.

The 16 code values are quantiles of N(0, 1) chosen so that zero is exact: 8 from the positive
half, 7 from the negative half, normalised to [-1, 1] (the paper's section 3 and appendix E).
Storage per block of `block` weights: 4-bit codes and one int8 scale; per `scaler_block`
scales: one fp32 factor; plus one fp32 mean of the scales. With 64 and 256 that is
4 + 8/64 + 32/(64*256) = 4.127 bits per weight (the paper's "4.127").

Quantization follows torchao's `to_nf4` (which follows the paper): codes are the nearest grid
value to w / absmax(block) with the exact absmax; the absmax scales are then stored as int8
around their mean (`_double_quantize`), and the weight is dequantized with the stored scale.
tests/test_lora.py checks codes and dequantized weights against torchao's NF4Tensor.
"""
from __future__ import annotations

import torch
from torch import nn

from kiln.errors import KilnError

# QLoRA's published code book (bitsandbytes `create_normal_map(offset=0.9677083)`), the oracle
# that `normal_grid()` reproduces from its definition.
OFFSET = 0.9677083   # mean of 1 - 1/(2*15) and 1 - 1/(2*16): the outermost quantile (appendix E)


def normal_grid(offset: float = OFFSET, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The NF4 code book from its definition: quantiles of N(0, 1), 8 positive (the largest at
    `offset`), 7 negative, and an exact zero, scaled so that the extremes are +-1."""
    ppf = lambda p: torch.special.ndtri(torch.tensor(p, dtype=torch.float64))   # noqa: E731
    pos = ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1].tolist())
    neg = -ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1].tolist())
    grid = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (grid / grid.abs().max()).to(dtype)


def _nearest(values: torch.Tensor, grid: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    out = torch.empty(values.numel(), dtype=torch.uint8)
    for start in range(0, values.numel(), chunk):
        piece = values[start:start + chunk].unsqueeze(-1)
        out[start:start + chunk] = (piece - grid).abs().argmin(dim=-1).to(torch.uint8)
    return out


def _double_quantize(absmax: torch.Tensor, scaler_block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block scales as int8 around their mean, one fp32 factor per `scaler_block` of them:
    q = clamp(round((s - mean) * 128 / absmax_group), -128, 127)."""
    mean = absmax.mean()
    centred = (absmax - mean).view(-1, scaler_block)
    factor = 256 / (2 * centred.abs().amax(dim=1))
    factor = torch.where(torch.isfinite(factor), factor, torch.ones_like(factor))   # all scales equal
    q = (centred * factor.unsqueeze(-1)).round().clamp(-128, 127).to(torch.int8)
    return q.flatten(), factor, mean


class NF4Weight(nn.Module):
    """A frozen weight stored as NF4 (buffers only, so it saves in safetensors and moves with the
    module); `forward()` returns the dequantized float weight."""

    def __init__(self, shape: tuple[int, ...], block: int = 64, scaler_block: int = 256,
                 grid: torch.Tensor | None = None):
        super().__init__()
        numel = int(torch.tensor(shape).prod())
        group = block * scaler_block
        padded = -(-numel // group) * group   # zero padding to whole scale groups (exact, never read)
        self.shape, self.block, self.scaler_block, self.numel = tuple(shape), block, scaler_block, numel
        self.register_buffer("codes", torch.zeros(padded // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(padded // block, dtype=torch.int8))
        self.register_buffer("factors", torch.ones(padded // group))
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("grid", normal_grid() if grid is None else grid.to(torch.float32))

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, block: int = 64, scaler_block: int = 256,
                   grid: torch.Tensor | None = None) -> "NF4Weight":
        if block % 2:
            raise KilnError(f"NF4 block size must be even (two codes per byte), got {block}")
        nf4 = cls(tuple(weight.shape), block, scaler_block, grid)
        flat = torch.zeros(nf4.codes.numel() * 2)
        flat[:nf4.numel] = weight.detach().float().flatten()
        blocks = flat.view(-1, block)
        absmax = blocks.abs().amax(dim=1)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))   # an all-zero block: codes of 0
        codes = _nearest((blocks / safe.unsqueeze(-1)).flatten(), nf4.grid)
        nf4.codes.copy_(codes[::2] << 4 | codes[1::2])
        q, factor, mean = _double_quantize(absmax, scaler_block)
        nf4.scales.copy_(q)
        nf4.factors.copy_(factor)
        nf4.mean.copy_(mean)
        return nf4

    def block_scales(self) -> torch.Tensor:
        """The stored (double-quantized) absmax of every block."""
        return (self.scales.view(-1, self.scaler_block).float() / self.factors.unsqueeze(-1)).flatten() + self.mean

    def forward(self) -> torch.Tensor:
        codes = torch.stack([self.codes >> 4, self.codes & 0xF], dim=-1).flatten().long()
        values = self.grid[codes].view(-1, self.block) * self.block_scales().unsqueeze(-1)
        return values.flatten()[:self.numel].view(self.shape)

    def bits_per_weight(self) -> float:
        """Stored bits over the weights they hold (codes, int8 scales, fp32 factors and mean)."""
        bits = self.codes.numel() * 8 + self.scales.numel() * 8 + self.factors.numel() * 32 + 32
        return bits / self.numel

    def extra_repr(self) -> str:
        return f"shape={self.shape}, block={self.block}, scaler_block={self.scaler_block}"


class NF4Linear(nn.Module):
    """A Linear whose weight is frozen NF4 (QLoRA's base layer); the bias stays float."""

    def __init__(self, in_features: int, out_features: int, bias: bool, block: int = 64, scaler_block: int = 256):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_nf4 = NF4Weight((out_features, in_features), block, scaler_block)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int = 64, scaler_block: int = 256) -> "NF4Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, block, scaler_block)
        layer.weight_nf4 = NF4Weight.from_float(linear.weight, block, scaler_block)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_nf4()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_nf4().to(x.dtype), self.bias)

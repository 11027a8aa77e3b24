"""Truncated SVD of a Linear layer: W (out x in) ~ (U_r S_r^1/2)(S_r^1/2 V_r^T), two thin Linears.

By Eckart-Young-Mirsky the rank-r truncation is the best rank-r approximation in Frobenius
norm, and its error is exactly sqrt(sum of the discarded squared singular values). A rank r
factorisation holds r * (in + out) weights instead of in * out, so it saves parameters only
below r = in * out / (in + out).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kiln.errors import KilnError


class LowRankLinear(nn.Module):
    """`second(first(x))`: in -> rank (no bias) -> out (the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """The singular values of a 2-D weight, in float64, largest first."""
    return torch.linalg.svdvals(weight.detach().double())


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep at least `energy` of sum(s^2)."""
    sq = s.double() ** 2
    total = sq.sum()
    if total == 0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    # a tiny tolerance so energy = 1.0 does not demand more than full rank through rounding
    return min(int((kept < energy - 1e-12).sum().item()) + 1, len(s))


def rank_for_budget(in_features: int, out_features: int, budget: float) -> int:
    """The largest rank whose factors hold at most `budget` of the dense weight count (>= 1)."""
    return max(1, math.floor(budget * in_features * out_features / (in_features + out_features)))


def svd_params(in_features: int, out_features: int, rank: int, bias: bool) -> int:
    return rank * (in_features + out_features) + (out_features if bias else 0)


def truncation_error(s: torch.Tensor, rank: int) -> float:
    """||W - W_r||_F of the rank-r truncation (Eckart-Young): the discarded singular values' norm."""
    return float(torch.sqrt((s[rank:].detach().double() ** 2).sum()))


def factorize_linear(linear: nn.Linear, rank: int, fqn: str = "linear") -> LowRankLinear:
    """The rank-`rank` truncated SVD of `linear`, as a LowRankLinear in the same dtype."""
    out_f, in_f = linear.weight.shape
    if not 1 <= rank <= min(in_f, out_f):
        raise KilnError(f"{fqn}: rank {rank} is outside [1, {min(in_f, out_f)}] for a {in_f}->{out_f} Linear")
    w = linear.weight.detach()
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    # the square root of S goes to both factors, so neither carries all the scale
    first = (root[:, None] * vh[:rank]).to(w.dtype)
    second = (u[:, :rank] * root[None, :]).to(w.dtype)
    low = LowRankLinear(in_f, out_f, rank, bias=linear.bias is not None).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        low.first.weight.copy_(first)
        low.second.weight.copy_(second)
        if linear.bias is not None:
            low.second.bias.copy_(linear.bias.detach())
    return low

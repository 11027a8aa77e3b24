"""Tucker-2 of a Conv2d (Kim et al. 2016, "Compression of deep convolutional neural networks
for fast and low power mobile applications"): the kernel W (out, in, kh, kw) is decomposed
along its two channel modes only,

    W ~ G x_0 U_out x_1 U_in,   G = W x_0 U_out^T x_1 U_in^T   (r_out, r_in, kh, kw)

with U_out, U_in the leading left singular vectors of the mode-0 and mode-1 unfoldings
(HOSVD). It runs as conv 1x1 (in -> r_in, U_in^T), conv kxk (r_in -> r_out, G, the original
stride/padding/dilation) and conv 1x1 (r_out -> out, U_out, the original bias). A pointwise
map commutes with spatial padding, so every padding mode is preserved; at full ranks the
three convs reproduce the original exactly.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kiln.errors import KilnError


class Tucker2Conv2d(nn.Module):
    """conv 1x1 (in -> r_in) -> conv kxk (r_in -> r_out) -> conv 1x1 (r_out -> out)."""

    def __init__(self, conv: nn.Conv2d, ranks: tuple[int, int]):
        super().__init__()
        r_in, r_out = ranks
        self.in_channels, self.out_channels, self.ranks = conv.in_channels, conv.out_channels, (r_in, r_out)
        self.first = nn.Conv2d(conv.in_channels, r_in, 1, bias=False)
        self.core = nn.Conv2d(r_in, r_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                              bias=False, padding_mode=conv.padding_mode)
        self.last = nn.Conv2d(r_out, conv.out_channels, 1, bias=conv.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, ranks (in, out)={self.ranks}"


def check_conv(conv: nn.Conv2d, fqn: str) -> None:
    """Tucker-2 as three plain convs needs one group (a grouped kernel is block-diagonal)."""
    if conv.groups != 1:
        raise KilnError(f"{fqn}: grouped Conv2d (groups={conv.groups}) is not supported by Tucker-2")


def mode_singular_values(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of the mode-1 (input channels) and mode-0 (output channels) unfoldings."""
    w = weight.detach().double()
    return torch.linalg.svdvals(_unfold(w, 1)), torch.linalg.svdvals(_unfold(w, 0))


def _unfold(w: torch.Tensor, mode: int) -> torch.Tensor:
    return w.movedim(mode, 0).reshape(w.shape[mode], -1)


def tucker2_params(conv: nn.Conv2d, r_in: int, r_out: int) -> int:
    k = math.prod(conv.kernel_size)
    return conv.in_channels * r_in + r_in * r_out * k + r_out * conv.out_channels + \
        (conv.out_channels if conv.bias is not None else 0)


def ranks_for_budget(conv: nn.Conv2d, budget: float) -> tuple[int, int]:
    """The largest ranks in the channels' proportion (r_in/in = r_out/out) whose three convs
    hold at most `budget` of the dense weight count; at least 1 each."""
    cin, cout, k = conv.in_channels, conv.out_channels, math.prod(conv.kernel_size)
    target = budget * cin * cout * k
    # params(p) = p*cin^2 + p^2*cin*cout*k + p*cout^2 (p the kept fraction): the positive root
    a, b = cin * cout * k, cin * cin + cout * cout
    p = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
    r_in, r_out = max(1, math.floor(p * cin)), max(1, math.floor(p * cout))
    return min(r_in, cin), min(r_out, cout)


def factorize_conv(conv: nn.Conv2d, ranks: tuple[int, int], fqn: str = "conv") -> Tucker2Conv2d:
    """HOSVD Tucker-2 of `conv` at ranks (r_in, r_out), as a Tucker2Conv2d in the same dtype."""
    check_conv(conv, fqn)
    r_in, r_out = ranks
    if not (1 <= r_in <= conv.in_channels and 1 <= r_out <= conv.out_channels):
        raise KilnError(f"{fqn}: ranks ({r_in}, {r_out}) are outside [1, {conv.in_channels}] x "
                        f"[1, {conv.out_channels}] for a {conv.in_channels}->{conv.out_channels} Conv2d")
    w = conv.weight.detach()
    wd = w.double()
    u_out = torch.linalg.svd(_unfold(wd, 0), full_matrices=False)[0][:, :r_out]   # (out, r_out)
    u_in = torch.linalg.svd(_unfold(wd, 1), full_matrices=False)[0][:, :r_in]     # (in, r_in)
    core = torch.einsum("oikl,or,is->rskl", wd, u_out, u_in)                       # (r_out, r_in, kh, kw)
    low = Tucker2Conv2d(conv, (r_in, r_out)).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        low.first.weight.copy_(u_in.T[:, :, None, None].to(w.dtype))
        low.core.weight.copy_(core.to(w.dtype))
        low.last.weight.copy_(u_out[:, :, None, None].to(w.dtype))
        if conv.bias is not None:
            low.last.bias.copy_(conv.bias.detach())
    return low

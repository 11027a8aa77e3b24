"""Batch norm over the whole global batch on CPU: torch's nn.SyncBatchNorm runs on GPUs only
("SyncBatchNorm expected input tensor to be on GPU"), so data-parallel ranks would each
normalise by their own slice and drift from one process. This one all-reduces each channel's
count, sum and sum of squares through torch.distributed's differentiable all_reduce."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.nn.functional import all_reduce


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm{1,2,3}d whose training statistics are those of every rank's batch together."""

    group = None

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.track_running_stats or self.momentum is None:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        count = torch.full((1,), x.numel() / c, dtype=x.dtype)
        packed = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]), group=self.group)
        n = packed[2 * c]
        mean = packed[:c] / n
        var = packed[c:2 * c] / n - mean * mean       # biased, as batch norm normalises
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach())
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var.detach() * n / (n - 1))
            self.num_batches_tracked.add_(1)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def convert(model: nn.Module, group=None) -> int:
    """Swap every batch norm for a GlobalBatchNorm holding the same tensors (names kept);
    returns how many."""
    count = 0
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
                child.__class__ = GlobalBatchNorm
                child.group = group
                count += 1
    return count

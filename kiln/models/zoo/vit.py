"""A tiny Vision Transformer for 28x28 digits."""
from __future__ import annotations

import torch
from torch import nn

from kiln.models.loaded import LoadedModel
from kiln.models.zoo import register
from kiln.models.zoo.layers import Block


class ViT(nn.Module):
    """ViT (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"): non-overlapping patches
    linearly embedded (a strided conv), a class token, learned positions, pre-LN blocks, and a
    linear head on the final class token."""

    def __init__(self, image_size: int = 28, patch: int = 4, in_channels: int = 1, classes: int = 10,
                 dim: int = 64, depth: int = 6, heads: int = 4, mlp_ratio: int = 2, dropout: float = 0.0):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, dropout=dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)            # (B, patches, dim)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


@register("vit_tiny", params=205_962, family="vision-transformer", task="classification", dataset="mnist",
          default_input="1x1x28x28 float32",
          description="tiny ViT for 28x28 digits: 4x4 patches (49 tokens + class token), dim 64, depth 6, 4 heads")
def vit_tiny() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("zoo:vit_tiny", ViT().eval(), (torch.randn(1, 1, 28, 28),))

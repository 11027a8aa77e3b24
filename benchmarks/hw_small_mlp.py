"""A small MLP for 8x8 digits (64-32-10): the designs the FPGA estimator is calibrated on
(benchmarks/hw_calibrate.py), small enough for yosys on a busy 2-core machine."""
from __future__ import annotations

import torch

from kiln.models.zoo.mlp import MLP


def small_mlp():
    torch.manual_seed(0)
    return MLP(in_features=64, hidden=(32,), classes=10).eval(), (torch.randn(1, 1, 8, 8),)

"""torch.utils.flop_counter on the eager model: the reference kiln's FLOPs are held against.

Two blind spots of flop_counter are filled so the reference is fair: the CPU fused attention
op gets the formula flop_counter uses for the GPU kernels (custom_mapping), and
mixture-of-experts models run their experts as the eager loop (plain matmuls it can see)
instead of transformers' opaque grouped-matmul op.
"""
from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from kiln.analysis.flops import sdpa_custom_mapping
from kiln.models.loaded import LoadedModel


def eager_experts(model: torch.nn.Module) -> torch.nn.Module:
    """The model (a copy where it changes) running its mixture-of-experts as the eager loop of
    plain matmuls flop_counter sees, instead of transformers' opaque grouped-matmul op."""
    config = getattr(model, "config", None)
    if getattr(config, "_experts_implementation", None) not in (None, "eager"):
        model = copy.deepcopy(model)
        for module in model.modules():
            if hasattr(module, "config"):
                module.config._experts_implementation = "eager"
    return model


def flop_counter_flops(loaded: LoadedModel, count_cpu_attention: bool = True) -> int:
    model = eager_experts(loaded.model)
    mapping = sdpa_custom_mapping() if count_cpu_attention else {}
    # not under no_grad: flop_counter's module tracker trips on some models (deberta-v2) there
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(*loaded.example_inputs, **loaded.example_kwargs)
    return counter.get_total_flops()

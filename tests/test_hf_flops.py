"""FLOPs of transformers architectures built from their configs against torch.utils.flop_counter.

flop_counter misses the CPU fused attention op (see OFFLINE.md), so the oracle gets the formula
it uses for the GPU attention kernels through custom_mapping; mixture-of-experts models run
their experts through an opaque transformers op, so the oracle runs the same weights with the
eager experts loop, which flop_counter sees as plain matmuls.
"""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kiln.analysis.cost import AnnotateCost
from kiln.analysis.flops import sdpa_custom_mapping
from kiln.graph.capture import capture
from kiln.models.spec import load

TYPES = [
    # encoders
    "bert", "roberta", "albert", "deberta-v2", "modernbert",
    # decoders
    "gpt2", "llama", "qwen3", "gemma", "phi", "falcon", "bloom", "opt",
    # state-space and mixture-of-experts
    "mamba", "mixtral", "qwen3_moe",
    # encoder-decoders
    "t5", "bart",
    # vision
    "vit", "swin", "convnext", "resnet", "mobilenet_v2", "efficientnet", "segformer",
    # audio and multimodal
    "wav2vec2", "whisper", "clip",
]


def oracle_flops(loaded) -> int:
    model = loaded.model
    if getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        model = copy.deepcopy(model)
        for module in model.modules():
            if hasattr(module, "config"):
                module.config._experts_implementation = "eager"
    # not under no_grad: flop_counter's module tracker trips on some models (deberta-v2) there
    with FlopCounterMode(display=False, custom_mapping=sdpa_custom_mapping()) as counter:
        model(*loaded.example_inputs, **loaded.example_kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("model_type", TYPES)
def test_hf_config_flops_match_flop_counter(model_type):
    loaded = load(f"hf-config:{model_type}")
    expected = oracle_flops(loaded)
    got = AnnotateCost()(capture(loaded)).record.flops
    assert expected > 0
    assert abs(got - expected) <= 0.01 * expected, (got, expected)


def test_at_least_fifteen_diverse_types():
    assert len(TYPES) >= 15

"""FLOPs of transformers architectures built from their configs against torch.utils.flop_counter.

flop_counter misses the CPU fused attention op (see OFFLINE.md), so the oracle gets the formula
it uses for the GPU attention kernels through custom_mapping; mixture-of-experts models run
their experts through an opaque transformers op, so the oracle runs the same weights with the
eager experts loop, which flop_counter sees as plain matmuls.
"""
import pytest

from kiln.analysis.cost import AnnotateCost
from kiln.analysis.oracle import flop_counter_flops
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


@pytest.mark.parametrize("model_type", TYPES)
def test_hf_config_flops_match_flop_counter(model_type):
    loaded = load(f"hf-config:{model_type}")
    expected = flop_counter_flops(loaded)
    got = AnnotateCost()(capture(loaded)).record.flops
    assert expected > 0
    assert abs(got - expected) <= 0.01 * expected, (got, expected)


def test_the_flop_check_covers_every_family_hf_config_builds():
    """The oracle is hf-config's own recipe table: each family it can build (decoder, SSM,
    encoder-decoder, vision transformer, CNN, audio, multimodal) has types in TYPES."""
    from kiln.models.hf_config import SUPPORTED

    assert set(TYPES) <= set(SUPPORTED)
    assert {SUPPORTED[t].family for t in TYPES} == {r.family for r in SUPPORTED.values()}


@pytest.mark.parametrize("model_type", ["bert", "llama", "vit", "wav2vec2"])
def test_attention_counted_like_the_eager_attention_rebuild(model_type):
    """A second oracle: the same weights with eager attention are plain matmuls to flop_counter."""
    import copy

    from transformers import AutoModel

    loaded = load(f"hf-config:{model_type}")
    eager = AutoModel.from_config(copy.deepcopy(loaded.model.config), attn_implementation="eager").eval()
    eager.load_state_dict(loaded.model.state_dict())
    eager_loaded = type(loaded)(loaded.spec, eager, loaded.example_inputs, loaded.example_kwargs)
    expected = flop_counter_flops(eager_loaded, count_cpu_attention=False)
    assert AnnotateCost()(capture(loaded)).record.flops == expected

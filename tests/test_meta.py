"""Analysis without weights (meta device) against analysis with them, flop_counter on real
weights, and the linearity of a transformer's cost in its number of layers.

The oracle for exactness at full size: every per-layer figure is the same in each layer, so
analyses at 2 and 4 layers fix (per layer, rest) and any depth's figures must be rest +
depth x per layer, exactly (integers: FLOPs, bytes, parameters; the peak activation does not
grow with depth).
"""
from __future__ import annotations

import pytest

from kiln.analysis.oracle import flop_counter_flops
from kiln.analysis.report import analyze
from kiln.errors import KilnError
from kiln.hardware.profiles import load_profile
from kiln.models.meta import load_for_analysis, load_meta, with_meta_input_shapes
from kiln.models.presets import PRESETS
from kiln.models.spec import load

H100 = load_profile("h100")
LLAMA_70B = ("hf-config:llama?hidden_size=8192&intermediate_size=28672&num_hidden_layers={}"
             "&num_attention_heads=64&num_key_value_heads=8&vocab_size=128256")


def _figures(a) -> dict:
    return {"flops": a.flops, "bytes": a.cost.bytes, "params": a.params, "param_bytes": a.param_bytes,
            "peak": a.memory.peak_activation_bytes, "uncounted": a.cost.uncounted_ops}


@pytest.mark.parametrize("spec", ["hf-config:llama", "hf-config:bert", "hf-config:vit", "hf-config:gpt2"])
def test_meta_analysis_is_the_analysis_with_weights_and_flop_counters(spec):
    real = load(spec)
    meta = load_meta(spec)
    assert not any(p.device.type == "meta" for p in real.model.parameters())
    assert all(p.device.type == "meta" for p in meta.model.parameters())
    with_weights, without = analyze(real, H100, measure_time=False), analyze(meta, H100, measure_time=False)
    assert with_weights.weights and not without.weights
    assert _figures(without) == _figures(with_weights)
    assert without.roofline.latency_s == with_weights.roofline.latency_s
    assert without.flops == flop_counter_flops(real)     # the oracle runs the real weights


def _per_layer(layers: int, seq: str = "1x4096") -> dict:
    loaded = load_meta(LLAMA_70B.format(layers))
    return _figures(analyze(with_meta_input_shapes(loaded, [seq]), H100, measure_time=False))


def _extrapolate(two: dict, four: dict, layers: int) -> dict:
    out = {}
    for key in ("flops", "bytes", "params", "param_bytes"):
        per_layer, rem = divmod(four[key] - two[key], 2)
        assert rem == 0
        out[key] = two[key] + (layers - 2) * per_layer
    return out | {"peak": two["peak"], "uncounted": two["uncounted"]}


def test_llama_70b_width_cost_is_linear_in_layers():
    two, four, five = (_per_layer(n, "1x1024") for n in (2, 4, 5))
    assert five == _extrapolate(two, four, 5)
    assert four["peak"] == two["peak"] and not two["uncounted"]


@pytest.mark.slow
def test_llama_70b_at_80_layers_is_its_per_layer_figures_times_80():
    two, four = _per_layer(2), _per_layer(4)
    assert _per_layer(80) == _extrapolate(two, four, 80)


def test_a_preset_is_built_without_weights_at_its_published_size():
    loaded, why = load_for_analysis("preset:gpt3-175b")
    assert "GB" in why
    params = sum(p.numel() for p in loaded.model.parameters())   # GPT-2 ties the LM head to the embedding
    assert abs(params - PRESETS["gpt3-175b"].params) <= 0.01 * PRESETS["gpt3-175b"].params
    assert loaded.example_kwargs["input_ids"].shape == (1, 2048)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_has_its_published_parameter_count(name):
    params = sum(p.numel() for p in load_meta(f"preset:{name}").model.parameters())
    # published counts are rounded (BERT-large's "340 M" is 335 M in its released config)
    assert abs(params - PRESETS[name].params) <= 0.015 * PRESETS[name].params, params


def test_a_preset_query_overrides_its_fields():
    loaded = load_meta("preset:llama3-8b?num_hidden_layers=2")
    assert len(loaded.model.model.layers) == 2 and loaded.model.config.hidden_size == 4096


def test_a_small_preset_query_that_fits_is_built_with_weights():
    loaded, why = load_for_analysis("preset:bert-large?num_hidden_layers=1&vocab_size=100&hidden_size=64"
                                    "&intermediate_size=128&num_attention_heads=4")
    assert why == "" and not any(p.is_meta for p in loaded.model.parameters())


@pytest.mark.parametrize("spec, message", [
    ("preset:nope", "unknown preset 'nope'; known: bert-large, gpt3-175b"),
    ("preset:llama3-8b?hidden_sise=4", "no field 'hidden_sise'"),
    ("preset:llama3-8b?num_hidden_layers=0", "positive integer"),
    ("preset:llama3-8b?num_hidden_layers=two", "expected int"),
])
def test_bad_presets_are_one_line_errors(spec, message):
    with pytest.raises(KilnError, match=message):
        load_meta(spec)


def test_loading_a_preset_too_big_for_memory_with_weights_is_refused():
    with pytest.raises(KilnError, match="analyse it without weights"):
        load("preset:llama3-70b")

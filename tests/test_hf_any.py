"""hf-config builds any transformers model type through the generic path (shrink.py, inputs.py):
a sample of types from every family captures with FLOPs exactly equal to flop_counter's (the
oracle: kiln.analysis.oracle, the CPU attention formula given and MoE experts as the eager
loop); shrinking keeps the model's own constraints; bad input is one line. The whole survey
is benchmarks/hf_types.py."""
import json
import random

import pytest

from kiln.analysis.cost import AnnotateCost
from kiln.analysis.oracle import flop_counter_flops
from kiln.errors import KilnError
from kiln.graph.capture import capture
from kiln.models.hf_config import SUPPORTED, all_types, load_hf_config
from kiln.models.hf_config.shrink import _split, node_factors, shrink_value
from kiln.models.hf_config.survey import SURVEY, read_survey

# One or two per family; recipe types (bert, llama, ...) are built here WITHOUT their recipe.
SAMPLE = [
    "bert", "roformer",          # text encoders
    "llama", "olmo",             # decoder LLMs
    "mixtral", "deepseek_v3",    # mixture of experts (DeepSeek: latent attention, grouped routing)
    "t5", "plbart",              # encoder-decoders
    "vit", "resnet",             # vision transformer, CNN
    "wav2vec2", "whisper",       # audio: raw samples, mel features
    "clip", "paligemma",         # multimodal: two towers, image placeholders in the text
    "mamba",                     # state-space
]


def _generic(model_type: str, **query):
    return load_hf_config(model_type, {k.replace("__", "."): str(v) for k, v in query.items()},
                          f"hf-config:{model_type}", generic=True)


@pytest.mark.parametrize("model_type", SAMPLE)
def test_generic_type_captures_with_flops_equal_to_flop_counter(model_type):
    loaded = _generic(model_type)
    assert not loaded.model.training and loaded.example_kwargs
    assert sum(p.numel() for p in loaded.model.parameters()) < 20e6  # CPU size
    expected = flop_counter_flops(loaded)
    assert expected > 0
    assert AnnotateCost()(capture(loaded)).record.flops == expected


def test_vision_language_model_gets_its_image_placeholders():
    loaded = _generic("paligemma")
    ids, config = loaded.example_kwargs["input_ids"], loaded.model.config
    assert "pixel_values" in loaded.example_kwargs
    assert int((ids == config.image_token_id).sum()) > 0


def test_one_width_divisor_keeps_heads_times_head_dim():
    """Oracle: the default config's own ratios (llama-7B: 32 heads x 128 = 4096, 8... kv heads)."""
    from transformers import LlamaConfig

    small = _generic("llama").model.config
    big = LlamaConfig()
    assert small.num_attention_heads * small.head_dim == small.hidden_size
    assert big.hidden_size // small.hidden_size == big.intermediate_size // small.intermediate_size
    assert small.num_hidden_layers == 2 and small.vocab_size == big.vocab_size


def test_head_divisor_leaves_grouped_query_ratios_dividing():
    import dataclasses

    # a gemma-like config node: 8 heads sharing 1 key/value head
    Node = dataclasses.make_dataclass("Node", [("num_attention_heads", int, 8), ("num_key_value_heads", int, 1)])
    factors = node_factors(Node(), 32)
    heads = shrink_value("num_attention_heads", 8, factors)
    kv = shrink_value("num_key_value_heads", 1, factors)
    assert heads % kv == 0 and kv == 1


def test_rope_sections_still_sum_to_half_the_shrunk_head():
    assert sum(_split([24, 20, 20], 8)) == 64 // 8
    assert sum(_split([16, 24, 24], 16)) == 64 // 16


def test_query_overrides_a_generic_type_and_derived_fields_follow():
    model = _generic("olmo", hidden_size=128, num_hidden_layers=3).model
    assert (model.config.hidden_size, len(model.layers)) == (128, 3)
    attention = model.layers[0].self_attn
    assert attention.head_dim * model.config.num_attention_heads == 128  # derived again, not stale
    assert tuple(attention.q_proj.weight.shape) == (128, 128)


@pytest.mark.parametrize("query, words", [
    ({"num_attention_heads": 5}, "hidden_size=64 is not a multiple of num_attention_heads=5"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"hiden_size": 3}, "has no attribute 'hiden_size'; did you mean hidden_size"),
    ({"foo_config__x": 1}, "no sub-config 'foo_config'"),
])
def test_bad_query_on_a_generic_type_is_one_line_naming_it(query, words):
    with pytest.raises(KilnError) as info:
        _generic("olmo", **query)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_constraint_across_a_sub_config_and_experts_are_named():
    with pytest.raises(KilnError, match="image_size=336 is not a multiple of patch_size=15"):
        _generic("llava", vision_config__patch_size=15)
    with pytest.raises(KilnError, match="cannot be routed to more experts than there are"):
        _generic("mixtral", num_local_experts=2, num_experts_per_tok=3)


def test_unknown_type_suggests_close_ones():
    with pytest.raises(KilnError, match=r"unknown model type 'olmoo'.*did you mean olmo"):
        _generic("olmoo")


def test_every_mapped_type_is_known():
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    assert set(MODEL_MAPPING_NAMES) <= set(all_types()) and set(SUPPORTED) <= set(all_types())


def test_survey_file_matches_what_kiln_models_hf_reads():
    meta, verdicts = read_survey(all_types())
    if not SURVEY.is_file():
        pytest.skip("no survey has been made")
    data = json.loads(SURVEY.read_text())
    assert meta["types_surveyed"] == len(data["types"])
    assert sum(v.stage != "not surveyed" for v in verdicts) == len(set(data["types"]) & set(all_types()))


def test_kiln_models_hf_lists_every_type_with_its_verdict(tmp_path):
    from typer.testing import CliRunner

    from kiln.cli.main import app

    result = CliRunner().invoke(app, ["models", "--hf", "--json", str(tmp_path / "t.json")])
    assert result.exit_code == 0, result.output
    assert "capture with FLOPs exact" in result.output
    data = json.loads((tmp_path / "t.json").read_text())
    rows = {r["type"]: r for r in data["types"]}
    assert set(rows) == set(all_types())
    assert all(r["flops_exact"] <= r["captures"] for r in rows.values())
    assert all(r["cause"] for r in rows.values() if r["stage"] not in ("ok", "not surveyed"))


@pytest.mark.slow
def test_a_bigger_sample_of_surveyed_ok_types_still_captures_exactly():
    """40 types the survey found exact, drawn at random: still exact (the survey is not stale)."""
    _, verdicts = read_survey(all_types())
    ok = [v.model_type for v in verdicts if v.stage == "ok"]
    if not ok:
        pytest.skip("no survey has been made")
    failures = []
    for model_type in random.Random(1).sample(ok, min(40, len(ok))):
        loaded = load_hf_config(model_type, {}, f"hf-config:{model_type}")
        if AnnotateCost()(capture(loaded)).record.flops != flop_counter_flops(loaded):
            failures.append(model_type)
    assert not failures


# Types the generic path reached after the 19:46 survey, one per cause fixed: a default config
# that leaves head_dim None (ministral), per-layer attributes (embedding_gemma2_text), M-RoPE
# sections under a partial rotary factor (glm_ocr_text), a time series (patchtsmixer).
@pytest.mark.parametrize("model_type", ["ministral", "embedding_gemma2_text", "glm_ocr_text", "patchtsmixer"])
def test_types_fixed_since_the_first_survey_capture_exactly(model_type):
    loaded = load_hf_config(model_type, {}, f"hf-config:{model_type}")
    expected = flop_counter_flops(loaded)
    assert expected > 0 and AnnotateCost()(capture(loaded)).record.flops == expected


def test_a_default_config_s_unset_head_dim_gets_its_standard_meaning():
    config = load_hf_config("ministral", {}, "hf-config:ministral").model.config
    assert config.head_dim == config.hidden_size // config.num_attention_heads


def test_time_series_input_is_the_context_window():
    loaded = load_hf_config("patchtsmixer", {}, "hf-config:patchtsmixer")
    config = loaded.model.config
    assert tuple(loaded.example_kwargs["past_values"].shape) == (2, config.context_length, config.num_input_channels)


@pytest.mark.slow
def test_vision_tower_fed_patches_and_their_grid_captures_exactly():
    """qwen2-vl-style towers take (patches, C x T x P x P) and each image's (t, h, w) grid; the
    grid is sizes, so the graph is specialised to it (capture's draft mode)."""
    loaded = load_hf_config("cosmos3_edge_vision", {}, "hf-config:cosmos3_edge_vision")
    assert loaded.size_inputs == ("grid_thw",)
    grid = loaded.example_kwargs["grid_thw"]
    assert loaded.example_kwargs["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    expected = flop_counter_flops(loaded)
    assert expected > 0 and AnnotateCost()(capture(loaded)).record.flops == expected


def test_head_divisor_keeps_a_rotary_head_a_multiple_of_4():
    import dataclasses

    # qwen3-vl's vision tower: 16 heads of 72; at width 1/16 the old rule left heads of 9
    Node = dataclasses.make_dataclass("Node", [("hidden_size", int, 1152), ("num_heads", int, 16)])
    factors = node_factors(Node(), 16)
    hidden = shrink_value("hidden_size", 1152, factors)
    heads = shrink_value("num_heads", 16, factors)
    assert hidden % heads == 0 and (hidden // heads) % 4 == 0


def test_oracle_counts_an_lstm_s_cells_as_kiln_does():
    """On CPU an LSTM runs as one oneDNN op flop_counter counts as 0; the oracle turns oneDNN
    off so it counts the cells' matmuls. Oracle of the oracle: 2 x batch x steps x 4h x (in + h)."""
    import torch

    from kiln.models.loaded import LoadedModel

    batch, steps, width, hidden = 2, 8, 40, 24
    loaded = LoadedModel("t", torch.nn.LSTM(width, hidden, batch_first=True).eval(),
                         (torch.randn(batch, steps, width),))
    expected = 2 * batch * steps * 4 * hidden * (width + hidden)
    assert flop_counter_flops(loaded) == expected == AnnotateCost()(capture(loaded)).record.flops


# Fixed on 2026-12-08: value-dependent control flow (longformer's `if is_global_attn`, jetmoe's
# per-expert token counts) captured in draft mode on the example's values; DETR's timm resnet50
# built as transformers' own ResNet; a lagged time series with its forecast window.
@pytest.mark.parametrize("model_type", ["longformer", "jetmoe", "detr", "time_series_transformer"])
def test_types_fixed_on_2026_12_08_capture_exactly(model_type):
    loaded = load_hf_config(model_type, {}, f"hf-config:{model_type}")
    expected = flop_counter_flops(loaded)
    assert expected > 0 and AnnotateCost()(capture(loaded)).record.flops == expected


def _shrunk_config(model_type: str):
    from kiln.models.hf_config import _config_class
    from kiln.models.hf_config.generic import default_config, generic_config, width_ladder

    base = default_config(_config_class(model_type, model_type), model_type)
    return base, generic_config(base, width_ladder(base)[0], {}, model_type)


def test_depthwise_conv_groups_shrink_with_their_width():
    """Oracle: the default config's own tie (mimi: upsample_groups == hidden_size)."""
    base, small = _shrunk_config("mimi")
    assert base.upsample_groups == base.hidden_size
    assert small.upsample_groups == small.hidden_size < base.hidden_size


def test_mamba_heads_times_head_dim_still_make_the_ssm_width():
    base, small = _shrunk_config("falcon_h1")
    assert base.mamba_n_heads * base.mamba_d_head == base.mamba_d_ssm
    assert small.mamba_n_heads * small.mamba_d_head == small.mamba_d_ssm < base.mamba_d_ssm


def test_timm_resnet_backbone_becomes_transformers_own_without_timm():
    import importlib.util

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm installed: its backbone is built as it is")
    base, _ = _shrunk_config("deformable_detr")
    backbone = base.backbone_config
    assert backbone.model_type == "resnet" and backbone.out_features == ["stage2", "stage3", "stage4"]

"""hf-config:TYPE: every supported architecture builds, runs, exports and matches eager."""
import dataclasses

import pytest
import torch

from kiln.errors import KilnError
from kiln.models.hf_config import SUPPORTED, load_hf_config

FAMILIES = {"transformer", "vision-transformer", "cnn", "audio", "encoder-decoder", "ssm", "multimodal"}


def _load(model_type: str, **query):
    query = {k.replace("__", "."): str(v) for k, v in query.items()}
    return load_hf_config(model_type, query, f"hf-config:{model_type}")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    items = out.to_tuple() if hasattr(out, "to_tuple") else out
    return next(t for t in map(_first_tensor, items) if t is not None)


def _error(model_type: str, **query) -> str:
    with pytest.raises(KilnError) as info:
        _load(model_type, **query)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# Data-dependent branches on .item(): torch.export stops on them; kiln captures them with the
# branch read off the example (draft export, `value_specialised`), never with a dynamic batch
NOT_CAPTURABLE = {"longformer", "led"}


@pytest.mark.parametrize("model_type", sorted(NOT_CAPTURABLE))
def test_value_dependent_types_capture_specialised_and_refuse_a_dynamic_batch_naming_the_construct(model_type):
    from kiln.graph.capture import capture

    loaded = _load(model_type)
    assert loaded.value_specialised
    eager = _first_tensor(loaded.run())
    assert torch.isfinite(eager).all()
    graph = capture(loaded)
    assert torch.allclose(_first_tensor(graph.program.module()(*loaded.example_inputs, **loaded.example_kwargs)),
                          eager, atol=1e-5)
    with pytest.raises(KilnError) as info:
        capture(loaded, dynamic_batch=True)
    assert "\n" not in str(info.value) and "if is_global_attn" in str(info.value)


@pytest.mark.parametrize("model_type", sorted(set(SUPPORTED) - NOT_CAPTURABLE))
def test_builds_runs_and_exports_like_eager(model_type):
    loaded = _load(model_type)
    assert not loaded.model.training
    assert loaded.family in FAMILIES and loaded.example_kwargs
    assert model_type in loaded.description and "\n" not in loaded.description
    with torch.no_grad():
        eager = _first_tensor(loaded.run())
        args, kwargs = loaded.example_inputs, loaded.example_kwargs
        program = torch.export.export(loaded.model, args, kwargs, strict=False)
        exported = _first_tensor(program.module()(*args, **kwargs))
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(exported, eager, atol=1e-4, rtol=1e-4)


def test_recipes_name_only_real_config_keys():
    from transformers import CONFIG_MAPPING

    for model_type, recipe in SUPPORTED.items():
        cls = CONFIG_MAPPING[model_type]
        keys = {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "attribute_map", {}))
        assert set(recipe.extra) <= keys, (model_type, set(recipe.extra) - keys)
        assert recipe.family in FAMILIES


def test_unknown_model_type_lists_supported():
    message = _error("bertt")
    assert "unknown model type 'bertt'" in message and "bert" in message


def test_unknown_query_key_names_it_and_suggests():
    message = _error("bert", hiden_size=32)
    assert "'hiden_size'" in message and "hidden_size" in message


def test_unknown_sub_config_key():
    assert "'patch_sise'" in _error("clip", vision_config__patch_sise=4)


@pytest.mark.parametrize("value, words",
                         [("abc", "cannot parse"), ("", "empty value"), ("2.5", "expected int")])
def test_bad_value(value, words):
    message = _error("bert", num_hidden_layers=value)
    assert words in message and "num_hidden_layers" in message


def test_config_transformers_rejects():
    assert "not a multiple" in _error("llama", num_attention_heads=5)


def test_model_that_fails_to_build():
    assert "building bert failed" in _error("bert", hidden_act="nope")


def test_override_takes_effect():
    base, deeper = _load("bert"), _load("bert", num_hidden_layers=3)
    assert deeper.model.config.num_hidden_layers == 3 and len(deeper.model.encoder.layer) == 3
    assert "3 layers" in deeper.description
    assert sum(p.numel() for p in deeper.model.parameters()) > sum(p.numel() for p in base.model.parameters())


def test_alias_and_sub_config_overrides():
    assert _load("gpt2", hidden_size=128).model.config.n_embd == 128
    assert _load("clip", vision_config__image_size=64).example_kwargs["pixel_values"].shape[-1] == 64
    assert _load("swin", depths="1,1", num_heads="2,2").model.config.depths == [1, 1]


def test_derived_settings_follow_overrides():
    assert _load("marian", vocab_size=500).model.config.decoder_vocab_size == 500
    assert _load("whisper", max_source_positions=16).example_kwargs["input_features"].shape[-1] == 32


def test_deterministic_and_cache_off():
    a, b = _load("llama", use_cache="true"), _load("llama")
    assert a.model.config.use_cache is False
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    assert torch.equal(a.example_kwargs["input_ids"], b.example_kwargs["input_ids"])


@pytest.mark.parametrize("key, value", [("num_hidden_layers", "-1"), ("hidden_size", "0"),
                                        ("num_attention_heads", "0"), ("vision_config__image_size", "-32"),
                                        ("depths", "1,0")])
def test_sizes_and_counts_below_one_are_refused_by_name(key, value):
    model_type = "clip" if key.startswith("vision") else "swin" if key == "depths" else "llama"
    message = _error(model_type, **{key: value})
    assert f"{key.replace('__', '.')}={value}" in message and "positive integer" in message


def test_fields_where_zero_or_minus_one_mean_something_still_accept_them():
    # pad_token_id 0 is BERT's own; a size check must not catch ids
    assert _load("bert", pad_token_id=0).model.config.pad_token_id == 0

"""Model specs: every scheme loads a runnable model; every bad spec is a one-line KilnError."""
import textwrap

import pytest
import torch

from kiln.errors import KilnError
from kiln.models.inputs import with_input_shapes
from kiln.models.spec import load
from kiln.models.zoo.transformers import minilm_path


def one_line_error(spec, match):
    with pytest.raises(KilnError) as err:
        load(spec)
    assert "\n" not in str(err.value)
    assert match in str(err.value), str(err.value)
    return str(err.value)


def test_zoo_minilm_is_the_real_pretrained_sentence_encoder():
    """Oracle: sentence-transformers' own pipeline on the same checkpoint."""
    from sentence_transformers import SentenceTransformer

    loaded = load("zoo:minilm")
    ours = loaded.run()
    reference = SentenceTransformer(minilm_path(), device="cpu").encode(
        ["A gripping, beautifully shot film whose quiet final act stays with you long after the credits."],
        convert_to_tensor=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in loaded.model.parameters()) == 22_713_216


def test_hf_dir_loads_a_real_checkpoint_with_its_tokenizer():
    loaded = load(f"hf:{minilm_path()}")
    assert loaded.example_kwargs["input_ids"].shape == (1, 128)
    assert loaded.example_kwargs["input_ids"][0, 0] == 101   # [CLS] from the real tokenizer
    assert loaded.run().last_hidden_state.shape == (1, 128, 384)


def test_hf_config_query_overrides_defaults():
    loaded = load("hf-config:bert?num_hidden_layers=3&hidden_size=32&num_attention_heads=2")
    assert loaded.model.config.num_hidden_layers == 3 and len(loaded.model.encoder.layer) == 3


FACTORY = textwrap.dedent('''
    import torch

    def plain():
        return torch.nn.Linear(4, 2), (torch.randn(3, 4),)

    def with_kwargs():
        class M(torch.nn.Module):
            def forward(self, x, scale=1.0):
                return x * scale
        return M(), (torch.randn(2),), {"scale": torch.tensor(3.0)}

    def attribute():
        m = torch.nn.Linear(4, 2)
        m.example_inputs = (torch.randn(1, 4),)
        return m

    def broken():
        raise ValueError("no weights for this size")

    def not_a_module():
        return 42
''')


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(FACTORY)
    return path


@pytest.mark.parametrize("name", ["plain", "with_kwargs", "attribute"])
def test_py_spec_is_what_the_factory_returns(factory_file, name):
    """The oracle is the factory itself, called again from the same RNG state: the same
    weights, the same example inputs (positional and keyword) and so the same output."""
    import importlib.util

    torch.manual_seed(0)
    loaded = load(f"py:{factory_file}:{name}")
    mod_spec = importlib.util.spec_from_file_location("factory_oracle", factory_file)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    torch.manual_seed(0)
    made = getattr(module, name)()
    model, args, kwargs = (made, made.example_inputs, {}) if isinstance(made, torch.nn.Module) else (*made, {})[:3]
    assert loaded.model.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert len(loaded.example_inputs) == len(args) and loaded.example_kwargs.keys() == kwargs.keys()
    for got, want in zip([*loaded.example_inputs, *loaded.example_kwargs.values()], [*args, *kwargs.values()]):
        assert torch.equal(got, want)
    torch.testing.assert_close(loaded.run(), model(*args, **kwargs), rtol=0, atol=0)


def test_bad_specs_are_one_line_errors(factory_file, tmp_path):
    one_line_error("resnet", "accepted: zoo:NAME")
    one_line_error("foo:bar", "unknown model spec scheme 'foo:'")
    one_line_error("zoo:resnet9000", "known: ")
    one_line_error(f"hf:{tmp_path / 'nowhere'}", "does not exist")
    one_line_error(f"hf:{tmp_path}", "no config.json")
    one_line_error("hf-config:not_a_model", "unknown model type 'not_a_model'")
    one_line_error("hf-config:bert?num_hiden_layers=3", "num_hiden_layers")
    one_line_error(f"py:{tmp_path / 'missing.py'}:f", "does not exist")
    one_line_error(f"py:{factory_file}:nope", "callables there: attribute, broken")
    one_line_error(f"py:{factory_file}:broken", "raised ValueError: no weights for this size")
    one_line_error(f"py:{factory_file}:not_a_module", "returned int")


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    import shutil

    for name in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{minilm_path()}/{name}", tmp_path / name)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    one_line_error(f"hf:{tmp_path}", "cannot load the weights")


def test_input_shape_override_resizes_tied_inputs_and_rejects_bad_shapes():
    loaded = with_input_shapes(load("zoo:minilm"), ["4x32"])
    assert {tuple(v.shape) for v in loaded.example_kwargs.values()} == {(4, 32)}
    assert loaded.run().shape == (4, 384)
    mlp = load("zoo:mlp")
    with pytest.raises(KilnError, match="rejected its inputs with input shape 2x3"):
        with_input_shapes(mlp, ["2x3"])
    with pytest.raises(KilnError, match="bad input shape '2by3'"):
        with_input_shapes(mlp, ["2by3"])
    with pytest.raises(KilnError, match="no tensor input 'pixels'; inputs: input0"):
        with_input_shapes(mlp, ["pixels=1x3"])

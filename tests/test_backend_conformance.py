"""Conformance of every registered backend, parametrized over the registry (a new backend, or a
new dtype of one, is tested without a new test).

Oracles: eager PyTorch on a small zoo model, within the tolerance of the backend's precision
(kiln.compile.backends.TOLERANCE), on inputs other than the ones it was built on; and kiln's
fake-quantized model for a model kiln quantized. A backend that lowers kiln's quantizers
(`lowers`) computes kiln's own integers times kiln's own scales, so it meets fp32's
tolerance against the fake-quantized model (configs/quant/w8a8.toml's calibrated per-tensor
inputs, which every int8 kernel here takes); an int8 backend with scales of its own would
quantize the model a second time, so it must refuse, in one line."""
from __future__ import annotations

import pytest
import torch

from kiln.compile.auto import at_batch
from kiln.compile.backends import BACKENDS, TOLERANCE, Precision, build, missing_package, parse_backend, precision_of
from kiln.compile.verify import relative_error
from kiln.errors import KilnError
from kiln.models.loaded import LoadedModel
from kiln.models.spec import load


def variants() -> list[str]:
    """Every registered backend with each of its dtypes (they change its precision)."""
    out = []
    for name in BACKENDS.names():
        if name.startswith("test-"):          # stand-ins other test files register
            continue
        dtypes = BACKENDS.get(name).options.get("dtype")
        out += [f"{name}:dtype={d}" for d in dtypes] if dtypes else [name]
    return out


@pytest.fixture(scope="module")
def mlp() -> LoadedModel:
    torch.manual_seed(0)
    return at_batch(load("zoo:mlp"), 4)


@pytest.fixture(scope="module")
def quantized_mlp(mlp) -> LoadedModel:
    """zoo:mlp as `kiln quantize` makes it with configs/quant/w8a8.toml (calibrated on random
    images here: the oracle is the fake-quantized model, whatever its scales)."""
    import copy

    from kiln.quant.config import parse_config
    from kiln.quant.run import prepare

    model = copy.deepcopy(mlp.model)
    gen = torch.Generator().manual_seed(1)
    table = {"weight": {"format": "int", "bits": 8, "granularity": "channel"},
             "input": {"format": "int", "bits": 8, "granularity": "tensor"}}
    prepare(model, parse_config(table), [torch.randn(16, 1, 28, 28, generator=gen) for _ in range(4)],
            forward=lambda m, b: m(b))
    return LoadedModel("test:quantized-mlp", model.eval(), mlp.example_inputs)


def _other_input(loaded: LoadedModel) -> torch.Tensor:
    return torch.randn(loaded.example_inputs[0].shape, generator=torch.Generator().manual_seed(7))


def _built(name: str, loaded: LoadedModel):
    spec = parse_backend(name)
    if need := missing_package(spec):
        pytest.skip(f"{need} is not installed")
    return spec, build(spec, loaded.model, loaded)


@pytest.mark.parametrize("name", variants())
def test_backend_matches_eager_within_its_precision(name, mlp):
    spec, fn = _built(name, mlp)
    x = _other_input(mlp)
    with torch.no_grad():
        err = relative_error(fn(x), mlp.model(x))
    assert err <= TOLERANCE[precision_of(spec)]


@pytest.mark.parametrize("name", variants())
def test_backend_matches_the_fake_quantized_model_or_refuses_it(name, quantized_mlp):
    spec = parse_backend(name)
    lowers = BACKENDS.get(spec.name).lowers(spec.opts()) is not None
    if precision_of(spec) is Precision.INT8 and not lowers:
        with pytest.raises(KilnError, match=r"not kiln's") as exc:
            _built(name, quantized_mlp)
        assert "\n" not in str(exc.value)
        return
    spec, fn = _built(name, quantized_mlp)
    x = _other_input(quantized_mlp)
    with torch.no_grad():
        err = relative_error(fn(x), quantized_mlp.model(x))
    assert err <= TOLERANCE[Precision.FP32 if lowers else precision_of(spec)]

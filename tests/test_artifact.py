"""Artifacts: a model whose architecture a transform changed saves, reloads bit-exactly, trains
from `--init`, and quantizes; a broken artifact is a one-line error.

Oracle: the saved model's own outputs (exact equality after reload)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.models.artifact import TRANSFORMS, load_artifact, load_source, register_transform, save_artifact


def _factor(model: nn.Module, record: dict) -> nn.Module:
    """A test transform: the hidden Linear becomes two Linears through `rank` units."""
    old = model.layers[2]
    model.layers[2] = nn.Sequential(nn.Linear(old.in_features, record["rank"], bias=False),
                                    nn.Linear(record["rank"], old.out_features))
    return model


if "test-factor" not in TRANSFORMS:
    register_transform("test-factor")(_factor)


def _artifact(tmp_path, rank=8):
    from kiln.models.spec import load

    torch.manual_seed(0)
    model = _factor(load("zoo:mlp").model, {"rank": rank})
    out = save_artifact(tmp_path / "art", model, spec="zoo:mlp", dataset="mnist",
                        transforms=[{"kind": "test-factor", "rank": rank}], report={"rank": rank})
    return model.eval(), out


def test_artifact_reloads_exactly(tmp_path):
    model, out = _artifact(tmp_path)
    src = load_artifact(out)
    assert src.model.layers[2][0].out_features == 8 and src.dataset == "mnist"
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(src.model(x), model(x))
    assert load_source(str(out)).transforms == [{"kind": "test-factor", "rank": 8}]
    assert json.loads((out / "report.json").read_text()) == {"rank": 8}


def test_nonempty_output_refused_and_nothing_left_on_failure(tmp_path):
    model, out = _artifact(tmp_path)
    with pytest.raises(KilnError, match="not empty"):
        save_artifact(out, model, spec="zoo:mlp", dataset="", transforms=[])
    with pytest.raises(ValueError):
        save_artifact(tmp_path / "bad", model, spec="zoo:mlp", dataset="", transforms=[{"rank": 1}])
    assert not (tmp_path / "bad").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_corrupt_or_unknown_artifact_is_one_error(tmp_path):
    _, out = _artifact(tmp_path)
    (out / "artifact.json").write_text("{not json")
    with pytest.raises(KilnError, match="corrupt"):
        load_artifact(out)
    (out / "artifact.json").write_text(json.dumps({"spec": "zoo:mlp", "transforms": [{"kind": "nope"}]}))
    with pytest.raises(KilnError, match="unknown model transform 'nope'"):
        load_artifact(out)


def test_train_from_artifact_keeps_its_architecture_and_reloads(tmp_path):
    from kiln.train.config import TrainConfig
    from kiln.train.trainer import evaluate_run, fit

    torch.set_num_threads(1)
    _, art = _artifact(tmp_path)
    cfg = TrainConfig(model="zoo:mlp", dataset="mnist", out=str(tmp_path / "ft"), epochs=1, max_steps=3,
                      batch_size=32, init=str(art))
    metrics = fit(cfg, progress=False)
    src = load_source(str(tmp_path / "ft"))
    assert src.model.layers[2][0].out_features == 8
    assert evaluate_run(tmp_path / "ft")["accuracy"] == pytest.approx(metrics["accuracy"], abs=0)


def test_quantized_artifact_reloads_exactly(tmp_path):
    from kiln.quant.run import load_quantized, quantize_run

    torch.set_num_threads(1)
    _, art = _artifact(tmp_path)
    cfg = tmp_path / "q.toml"
    cfg.write_text('weight = "int8"\ninput = "int8"\n')
    res = quantize_run(str(art), cfg, tmp_path / "q", calib_batches=2, batch_size=16, evaluate=False)
    again, _ = load_quantized(tmp_path / "q")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again(x), res["model"].eval()(x))


def test_eval_of_an_artifact_measures_its_model(tmp_path):
    from kiln.data import load_dataset
    from kiln.quant.run import evaluate_model
    from kiln.train.trainer import evaluate_run

    torch.set_num_threads(1)
    model, art = _artifact(tmp_path)
    expected = evaluate_model(model, load_dataset("mnist", seed=0))[1]
    assert evaluate_run(art)["accuracy"] == expected

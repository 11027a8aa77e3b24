"""The one run format, and a conformance suite every registered transform runs: applied to a
zoo model, saved, restored and run, it gives the saved model's outputs exactly; `kiln eval`
measures the stored metric again exactly; runs of earlier kiln are named with the command that
redoes them; quantization comes last in a chain.

Oracles: the saved model's own outputs (torch.equal after reload) and its own measured metric."""
from __future__ import annotations

import json
from typing import Callable

import pytest
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.runs.artifact import (ARTIFACT_FILE, load_artifact, load_source, read_artifact, require_float,
                                save_artifact, save_source)
from kiln.runs.metrics import metric_record
from kiln.runs.transforms import TRANSFORMS, TransformRecord

torch.set_num_threads(1)


def _mnist_batches(n=2, size=16):
    from kiln.data import load_dataset
    from kiln.train.evaluation import calibration_batches

    return calibration_batches(load_dataset("mnist", seed=0), n, size, 0)


def _unstructured(model, permanent):
    from kiln.prune.unstructured import make_permanent, prune_unstructured

    result = prune_unstructured(model, 0.5, "magnitude", "global")
    if permanent:
        make_permanent(result.model)
    return result.model, result.record | {"permanent": permanent}


def _nm(model):
    from kiln.prune.nm import prune_nm

    result = prune_nm(model, 2, 4, targets=["fc"])
    return result.model, result.record | {"permanent": False}


def _structured(model):
    from kiln.prune.structured import prune_structured

    result = prune_structured(model, (torch.randn(1, 1, 28, 28),), 0.5)
    return result.model, result.record


def _lowrank(model):
    from kiln.lowrank.apply import factorize
    from kiln.lowrank.config import parse_config

    model, _, record = factorize(model, parse_config({"energy": 0.9, "rules": [{"match": "fqn:fc", "rank": 3}]}).plan(model))
    return model, record


def _lora(qlora: bool):
    def apply(model):
        from kiln.lowrank.lora import LoraConfig, LoraLinear, apply as adapt

        record = adapt(model, LoraConfig(r=4, alpha=8, qlora=qlora, block=16, scaler_block=4))
        torch.manual_seed(2)
        for m in model.modules():   # trained adapters: B away from its zero start
            if isinstance(m, LoraLinear):
                torch.nn.init.normal_(m.lora_B.weight, std=0.1)
        return model, record
    return apply


def _early_exit(model):
    from kiln.adapt.early_exit import EarlyExit, heads_for, probe
    from kiln.adapt.restore import record_of

    names, shapes, classes = probe(model, ["features.2", "features.6"], (torch.randn(1, 1, 28, 28),), {})
    torch.manual_seed(1)
    ee = EarlyExit(model, names, heads_for(shapes, classes, 1, 0), "entropy", 0.5)
    return ee, record_of(ee, shapes, classes, 1, 0)


def _quant(table):
    def apply(model):
        from kiln.quant.config import parse_config
        from kiln.quant.run import prepare

        config = parse_config(table)
        from kiln.quant.apply import quant_record

        prepare(model, config, _mnist_batches())
        return model, quant_record(model, config)
    return apply


# kind -> (zoo spec, apply(model) -> (model, flat record or TransformRecord))
CASES: dict[str, tuple[str, Callable]] = {
    "prune-unstructured/masks": ("zoo:cnn", lambda m: _unstructured(m, permanent=False)),
    "prune-unstructured/permanent": ("zoo:cnn", lambda m: _unstructured(m, permanent=True)),
    "prune-nm": ("zoo:cnn", _nm),
    "prune-structured": ("zoo:cnn", _structured),
    "lowrank": ("zoo:cnn", _lowrank),
    "lora/float": ("zoo:mlp", _lora(False)),
    "lora/nf4": ("zoo:mlp", _lora(True)),
    "early-exit": ("zoo:cnn", _early_exit),
    "quant/int4-int8": ("zoo:cnn", _quant({"weight": {"format": "int", "bits": 4},
                                          "input": {"format": "int", "bits": 8, "calib": "percentile"}})),
    "quant/gptq": ("zoo:cnn", _quant({"weight": {"format": "int", "bits": 4, "granularity": "group", "group_size": 16},
                                     "targets": ["Linear"], "gptq": {"block": 16}})),
    "quant/smoothquant": ("zoo:vit_tiny", _quant({"weight": "int8", "input": "int8", "targets": ["Linear"],
                                                 "smoothquant": {"alpha": 0.5}})),
}


def test_every_registered_transform_has_a_conformance_case():
    assert {case.split("/")[0] for case in CASES} == set(TRANSFORMS.names())


@pytest.mark.parametrize("case", sorted(CASES))
def test_transform_saves_restores_and_gives_identical_outputs(case, tmp_path):
    from kiln.models.spec import load

    spec, apply = CASES[case]
    model, record = apply(load(spec).model.eval())
    record = record if isinstance(record, TransformRecord) else TransformRecord.from_flat(record)
    assert record.kind == case.split("/")[0] and json.loads(json.dumps(record.config)) == record.config
    out = save_artifact(tmp_path / "run", model, spec=spec, dataset="mnist", transforms=[record])
    meta = json.loads((out / ARTIFACT_FILE).read_text())
    assert meta["format"] == 1 and meta["transforms"] == [record.to_json()]
    again = load_artifact(out)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again.model(x), model.eval()(x))
    assert again.transforms == [record]


def test_eval_reproduces_the_stored_metric_exactly(tmp_path):
    from kiln.data import load_dataset
    from kiln.train.evaluation import evaluate_model, evaluate_run

    spec, apply = CASES["quant/int4-int8"]
    from kiln.models.spec import load

    model, record = apply(load(spec).model.eval())
    key, value = evaluate_model(model, load_dataset("mnist", seed=0))
    save_artifact(tmp_path / "run", model, spec=spec, dataset="mnist", transforms=[record],
                  metrics=metric_record(key, before=None, after=value))
    result = evaluate_run(tmp_path / "run")
    assert result["value"] == value and result["recorded"] == value and result["reproduced"]


def test_nonempty_output_refused_and_nothing_left_on_failure(tmp_path):
    from kiln.models.spec import load

    model = load("zoo:mlp").model
    save_artifact(tmp_path / "art", model, spec="zoo:mlp", dataset="mnist", transforms=[])
    with pytest.raises(KilnError, match="not empty"):
        save_artifact(tmp_path / "art", model, spec="zoo:mlp", dataset="", transforms=[])
    with pytest.raises(TypeError):
        save_artifact(tmp_path / "bad", model, spec="zoo:mlp", dataset="", transforms=[{"kind": "lowrank"}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_corrupt_unknown_or_newer_records_are_one_line_errors(tmp_path):
    from kiln.models.spec import load

    out = save_artifact(tmp_path / "art", load("zoo:mlp").model, spec="zoo:mlp", dataset="mnist", transforms=[])
    meta = out / ARTIFACT_FILE
    meta.write_text("{not json")
    with pytest.raises(KilnError, match="corrupt"):
        load_artifact(out)
    bad = {"format": 1, "spec": "zoo:mlp", "transforms": []}
    meta.write_text(json.dumps(bad | {"transforms": [{"kind": "nope", "version": 1, "config": {}}]}))
    with pytest.raises(KilnError, match="unknown model transform 'nope'"):
        load_artifact(out)
    meta.write_text(json.dumps(bad | {"transforms": [{"kind": "lowrank", "version": 99, "config": {}}]}))
    with pytest.raises(KilnError, match="version 99 was written by a newer kiln"):
        load_artifact(out)
    meta.write_text(json.dumps(bad | {"transforms": [{"kind": "lowrank", "config": "lowrank.toml"}]}))
    with pytest.raises(KilnError, match="needs exactly kind, version and config"):
        load_artifact(out)


def test_runs_of_the_earlier_release_load_or_name_the_command_that_redoes_them(tmp_path):
    from kiln.models.spec import load
    from kiln.runs.weights import save_weights

    quant = tmp_path / "q"
    quant.mkdir()
    (quant / "quant.toml").write_text('weight = "int8"\n')
    (quant / "source.toml").write_text('src = "runs/cnn"\nspec = "zoo:cnn"\n')
    with pytest.raises(KilnError) as err:
        load_source(str(quant))
    assert str(err.value).count("\n") == 0 and f'kiln quantize "runs/cnn" --config {quant}/quant.toml' in str(err.value)
    train = tmp_path / "t"
    train.mkdir()
    (train / "config.toml").write_text('model = "zoo:cnn"\n')
    with pytest.raises(KilnError, match=rf"earlier kiln.*`kiln train --config {train}/config.toml --out NEW_DIR`"):
        load_source(str(train))
    from typer.testing import CliRunner

    from kiln.cli.main import app

    for legacy in (quant, train):    # the command line says it in one line, exit 2
        result = CliRunner().invoke(app, ["eval", str(legacy)])
        assert result.exit_code == 2 and result.output.count("\n") == 1 and "NEW_DIR" in result.output
    # the first artifact format (flat records, no "format") loads
    old = tmp_path / "old"
    old.mkdir()
    model, record = _lowrank(load("zoo:cnn").model.eval())
    (old / ARTIFACT_FILE).write_text(json.dumps({"spec": "zoo:cnn", "dataset": "mnist", "transforms": [record]}))
    save_weights(model, old / "model.safetensors")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_artifact(old).model(x), model.eval()(x))
    (old / ARTIFACT_FILE).write_text(json.dumps({"spec": "zoo:cnn", "transforms": [{"kind": "quant", "run": "q"}]}))
    with pytest.raises(KilnError, match="after quantization, which cannot be restored"):
        read_artifact(old)


def test_prune_lowrank_early_exit_refuse_a_quantized_source_naming_the_order(tmp_path):
    from kiln.cli.main import app
    from typer.testing import CliRunner

    from kiln.models.spec import load

    model, record = CASES["quant/int4-int8"][1](load("zoo:cnn").model.eval())
    q = save_artifact(tmp_path / "q", model, spec="zoo:cnn", dataset="mnist", transforms=[record])
    with pytest.raises(KilnError, match="quantize last"):
        require_float(load_source(str(q)), "prune")
    runner = CliRunner()
    result = runner.invoke(app, ["prune", str(q), "--out", str(tmp_path / "p"), "--ratio", "0.5"])
    assert result.exit_code == 2 and "run `kiln prune` on the model before quantization" in result.output
    assert not (tmp_path / "p").exists()


def test_a_chain_keeps_every_transform_in_order(tmp_path):
    """prune -> lowrank -> quantize through the run entry points; the last run reloads bit-exactly
    and names the three transforms in the order applied."""
    from kiln.prune.config import parse_config as prune_config
    from kiln.prune.run import prune_run
    from kiln.quant.config import parse_config as quant_config
    from kiln.quant.run import quantize_run

    prune_run("zoo:cnn", prune_config({"ratio": 0.5}), tmp_path / "p", evaluate=False, progress=False)
    from kiln.lowrank.config import parse_config as lowrank_config
    from kiln.lowrank.run import lowrank_run

    cfg = lowrank_config({"energy": 0.9, "rules": [{"match": "fqn:fc", "rank": 3}]})
    lowrank_run(str(tmp_path / "p"), cfg, tmp_path / "l", evaluate=False)
    res = quantize_run(str(tmp_path / "l"), quant_config({"weight": "int8", "input": "int8"}), tmp_path / "q",
                       calib_batches=2, batch_size=16, evaluate=False)
    again = load_source(str(tmp_path / "q"))
    assert [t.kind for t in again.transforms] == ["prune-unstructured", "lowrank", "quant"]
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again.model(x), res["model"].eval()(x))


def test_save_source_appends_the_commands_record(tmp_path):
    from kiln.models.spec import load

    model, record = _lowrank(load("zoo:cnn").model.eval())
    record = TransformRecord.from_flat(record)
    src = load_source("zoo:cnn")
    out = save_source(tmp_path / "a", src, model, record)
    assert read_artifact(out).transforms == (record,) and read_artifact(out).dataset == "mnist"
    assert isinstance(load_artifact(out).model.fc, nn.Module)


def test_every_commands_run_is_measured_again_exactly_by_eval(tmp_path):
    """prune (fine-tuned), lowrank and quantize write one metrics schema; `kiln eval` reloads
    each run and measures the value its command stored, exactly."""
    from kiln.lowrank.config import parse_config as lowrank_config
    from kiln.lowrank.run import lowrank_run
    from kiln.prune.config import parse_config as prune_config
    from kiln.prune.run import prune_run
    from kiln.quant.config import parse_config as quant_config
    from kiln.quant.run import quantize_run
    from kiln.train.evaluation import evaluate_run

    prune_run("zoo:mlp", prune_config({"ratio": 0.5, "finetune": {"epochs": 1, "max_steps": 2, "batch_size": 32}}),
              tmp_path / "p", progress=False)
    cfg = lowrank_config({"energy": 0.9, "rules": [{"match": "fqn:head", "rank": 4}]})
    lowrank_run(str(tmp_path / "p"), cfg, tmp_path / "l")
    quantize_run(str(tmp_path / "l"), quant_config({"weight": "int8"}), tmp_path / "q", calib_batches=2, batch_size=16)
    for run, keys in (("p", {"before", "after", "after_finetune"}), ("l", {"before", "after"}), ("q", {"before", "after"})):
        stored = json.loads((tmp_path / run / "metrics.json").read_text())
        assert stored["metric"] == "accuracy" and stored["split"] == "test"
        assert keys <= set(stored) and ("after_finetune" in stored) == (run == "p")
        result = evaluate_run(tmp_path / run)
        assert result["reproduced"] and result["value"] == (stored.get("after_finetune") or stored["after"])


def test_qat_with_a_quant_config_records_the_table_and_reloads(tmp_path):
    from kiln.quant.config import parse_config as quant_config
    from kiln.train.config import TrainConfig
    from kiln.train.evaluation import evaluate_run
    from kiln.train.trainer import fit

    q = tmp_path / "q.toml"
    q.write_text('weight = "int8"\ninput = "int8"\n')
    metrics = fit(TrainConfig(model="zoo:mlp", dataset="mnist", quant=str(q), out=str(tmp_path / "qat"), epochs=1,
                              max_steps=3, batch_size=32, calib_batches=2), progress=False)
    q.write_text("this file may change or vanish: the run keeps the table\n")
    meta = read_artifact(tmp_path / "qat")
    (record,) = [t.to_json() for t in meta.transforms]
    assert (record["kind"], record["version"], record["config"]["smoothed"]) == ("quant", 1, [])
    assert quant_config(record["config"]["quant"]) == quant_config({"weight": "int8", "input": "int8"})
    assert evaluate_run(tmp_path / "qat")["value"] == metrics["after"]

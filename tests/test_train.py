"""The trainer: learns, checkpoints, resumes exactly, reproduces its metric, and refuses bad input."""
import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from kiln.errors import Interrupted, KilnError
from kiln.train import tasks
from kiln.train.config import TrainConfig
from kiln.train.evaluation import evaluate_run
from kiln.train.trainer import fit

FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    def mlp():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10))
        return model, (torch.randn(1, 1, 8, 8),)

    def plain():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        return model, (torch.randn(1, 1, 8, 8),)
''')


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "digits_mlp.py"
    path.write_text(FACTORY)
    return f"py:{path}:mlp"


def cfg(spec, out, **kw):
    base = dict(model=spec, dataset="digits", out=str(out), epochs=2, lr=3e-3, batch_size=32, seed=0)
    return TrainConfig(**(base | kw))


def test_trains_checkpoints_and_eval_reproduces_exactly(spec, tmp_path):
    run = tmp_path / "run"
    metrics = fit(cfg(spec, run, epochs=4), progress=False)
    assert metrics["metric"] == "accuracy" and metrics["after"] > 0.85   # real digits, 4 short epochs
    assert sorted(p.name for p in run.iterdir()) == ["artifact.json", "config.toml", "last.safetensors",
                                                      "metrics.json", "model.safetensors", "state.pt"]
    assert json.loads((run / "metrics.json").read_text())["after"] == metrics["after"]
    again = evaluate_run(run)
    assert again["value"] == metrics["after"] and again["reproduced"]


def test_same_seed_same_weights(spec, tmp_path):
    fit(cfg(spec, tmp_path / "a"), progress=False)
    fit(cfg(spec, tmp_path / "b"), progress=False)
    a, b = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_interrupt_matches_an_uninterrupted_run(spec, tmp_path, monkeypatch):
    fit(cfg(spec, tmp_path / "full", epochs=3), progress=False)
    real = tasks.evaluate
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:          # during epoch 2's validation, before its checkpoint
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, "evaluate", interrupted)
    with pytest.raises(Interrupted, match="checkpoint .* is intact"):
        fit(cfg(spec, tmp_path / "cut", epochs=3), progress=False)
    monkeypatch.setattr(tasks, "evaluate", real)
    state = torch.load(tmp_path / "cut" / "state.pt", weights_only=False)
    assert state["epoch"] == 1      # the last good checkpoint is epoch 1's
    fit(cfg(spec, tmp_path / "cut", epochs=3), resume=True, progress=False)
    a = load_file(tmp_path / "full" / "last.safetensors")
    b = load_file(tmp_path / "cut" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_are_one_line_errors(spec, tmp_path):
    with pytest.raises(KilnError, match="dataset digits does not fit model zoo:mlp"):
        fit(cfg("zoo:mlp", tmp_path / "x"), progress=False)
    with pytest.raises(KilnError, match="optimizer must be one of"):
        cfg(spec, tmp_path / "y", optimizer="adam")
    with pytest.raises(KilnError, match="does not exist"):
        evaluate_run(tmp_path / "nowhere")
    run = tmp_path / "run"
    fit(cfg(spec, run, epochs=1), progress=False)
    (run / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(KilnError, match="corrupt"):
        evaluate_run(run)
    with pytest.raises(KilnError, match="already exists"):
        fit(cfg(spec, run, epochs=1), progress=False)


def test_config_from_toml_rejects_unknown_keys(tmp_path):
    from kiln.config import load_toml, to_toml

    good = TrainConfig(model="zoo:cnn", epochs=3, lr=0.01, bf16=True)
    path = tmp_path / "t.toml"
    path.write_text(to_toml(good))
    assert load_toml(TrainConfig, path) == good
    path.write_text('model = "zoo:cnn"\nepoch = 3\n')
    with pytest.raises(KilnError, match="unknown key 'epoch'"):
        load_toml(TrainConfig, path)
    path.write_text('model = "zoo:cnn"\nepochs = "three"\n')
    with pytest.raises(KilnError, match="'epochs' needs int"):
        load_toml(TrainConfig, path)


@pytest.mark.distributed
def test_two_processes_end_with_the_same_parameters_as_one(spec, tmp_path):
    from kiln.train.distributed import launch

    base = dict(epochs=1, max_steps=6, batch_size=32, threads=1, optimizer="sgd", lr=0.05)
    # dropout-free: DDP ranks draw their own dropout masks
    plain = spec.replace(":mlp", ":plain")
    fit(cfg(plain, tmp_path / "one", **base), progress=False)
    assert launch(cfg(plain, tmp_path / "two", **base), nproc=2) == 0
    a = load_file(tmp_path / "one" / "last.safetensors")
    b = load_file(tmp_path / "two" / "last.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_resume_refuses_changes_that_break_exact_continuation(spec, tmp_path):
    run = tmp_path / "run"
    fit(cfg(spec, run, epochs=1), progress=False)
    with pytest.raises(KilnError, match="cannot change lr"):
        fit(cfg(spec, run, epochs=2, lr=0.1), resume=True, progress=False)
    fit(cfg(spec, run, epochs=2), resume=True, progress=False)    # more epochs is fine
    assert "epochs = 2" in (run / "config.toml").read_text()


def test_a_run_remembers_its_split_seed_so_eval_measures_the_same_test_split(spec, tmp_path):
    from kiln.runs.artifact import read_artifact

    run = tmp_path / "run"
    metrics = fit(cfg(spec, run, epochs=1, seed=3), progress=False)
    assert read_artifact(run).data_seed == 3
    assert evaluate_run(run)["value"] == metrics["after"]


def test_a_failed_resume_leaves_the_run_byte_identical(spec, tmp_path):
    run = tmp_path / "run"
    fit(cfg(spec, run, epochs=1), progress=False)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(KilnError, match="cannot change lr"):
        fit(cfg(spec, run, epochs=2, lr=0.1), resume=True, progress=False)
    (run / "state.pt").write_bytes(b"corrupt")
    with pytest.raises(KilnError, match="trainer state .* cannot be read"):
        fit(cfg(spec, run, epochs=2), resume=True, progress=False)
    after = {p.name: p.read_bytes() for p in run.iterdir()}
    assert after == before | {"state.pt": b"corrupt"}


def test_a_teacher_of_another_task_leaves_nothing_behind(spec, tmp_path):
    with pytest.raises(KilnError, match="teacher zoo:gpt does not fit the data"):
        fit(cfg(spec, tmp_path / "run", teacher="zoo:gpt"), progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "digits_mlp.py"]


def test_node_classification_run_evaluates_again_exactly(tmp_path):
    run = tmp_path / "gcn"
    metrics = fit(TrainConfig(model="zoo:gcn", dataset="karate", out=str(run), epochs=30, lr=0.01,
                              schedule="constant"), progress=False)
    assert evaluate_run(run)["value"] == metrics["after"]


def test_cli_train_and_eval_round_trip(spec, tmp_path):
    from typer.testing import CliRunner

    from kiln.cli.main import app

    runner = CliRunner()
    run, out = tmp_path / "run", tmp_path / "m.json"
    result = runner.invoke(app, ["train", spec, "--dataset", "digits", "--epochs", "1", "--out", str(run), "--json", str(out)])
    assert result.exit_code == 0, result.output
    recorded = json.loads(out.read_text())["after"]
    result = runner.invoke(app, ["eval", str(run), "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0 and "reproduced" in result.output
    assert json.loads((tmp_path / "e.json").read_text())["value"] == recorded
    bad = tmp_path / "bad.toml"
    bad.write_text(f'model = "{spec}"\nlearning_rate = 0.1\n')
    result = runner.invoke(app, ["train", "--config", str(bad), "--out", str(tmp_path / "never")])
    assert result.exit_code == 2 and "unknown key 'learning_rate'" in result.stderr
    assert not (tmp_path / "never").exists()
    result = runner.invoke(app, ["eval", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1


@pytest.mark.parametrize("name, cls, expected", [
    ("adamw", torch.optim.AdamW, {"lr": 0.02, "weight_decay": 0.1}),
    ("sgd", torch.optim.SGD, {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.8, "nesterov": True}),
])
def test_the_optimizer_registry_builds_what_the_config_names(name, cls, expected):
    """Oracle: the config's own numbers in the optimizer's param group; frozen parameters left out."""
    from kiln.train.optimizers import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    opt = build_optimizer(TrainConfig(model="-", optimizer=name, lr=0.02, weight_decay=0.1, momentum=0.8), model)
    (group,) = opt.param_groups
    assert type(opt) is cls and {k: group[k] for k in expected} == expected
    assert [id(p) for p in group["params"]] == [id(model[0].bias), id(model[1].weight), id(model[1].bias)]


def test_an_unknown_optimizer_names_the_registered_ones():
    with pytest.raises(KilnError, match="optimizer must be one of adamw, sgd"):
        TrainConfig(model="-", optimizer="lamb")

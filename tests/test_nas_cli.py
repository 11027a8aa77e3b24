"""kiln nas: configs (unknown keys are errors, TOML round trip), the bad-input contract, run dirs
that rebuild the found network exactly."""
import json

import pytest
import tomllib
import torch
from typer.testing import CliRunner

from kiln.cli.main import app
from kiln.config import from_dict, to_toml
from kiln.errors import KilnError
from kiln.search.nas.run import load_config
from kiln.search.nas.fit import accuracy, load_data
from kiln.search.nas.space import Genotype, Macro, discrete_network
from kiln.runs.weights import load_weights

runner = CliRunner()

TINY = """
dataset = "mnist"
[space]
ops = ["none", "skip_connect", "max_pool_3x3", "sep_conv_3x3"]
nodes = 2
channels = 4
layers = 2
[search]
time_budget_s = 30
max_archs = 2
val_samples = 50
[search.proxy]
epochs = 0.02
[retrain]
epochs = 0.05
"""


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _nas(tmp_path, method: str, toml: str, out: bool = True):
    cfg = tmp_path / "n.toml"
    cfg.write_text(toml)
    args = ["nas", method, "--config", str(cfg), "--no-progress"]
    if out:
        args += ["--out", str(tmp_path / "run")]
    return runner.invoke(app, args)


@pytest.mark.parametrize("toml, words", [
    ('datset = "mnist"', "unknown key 'datset'"),
    ('[space]\nopz = ["skip_connect"]', "unknown key 'opz'"),
    ('[spaces]\nnodes = 2', "unknown key 'spaces'"),
    ('[search.proxy]\nepochz = 1', "unknown key 'epochz'"),
    ('[space]\nops = ["none"]', "no valid architecture"),
    ('[space]\nops = []', "no valid architecture"),
    ('[space]\nops = "skip_connect"', "needs a list of str"),
    ('[space]\nnodes = "four"', "needs int"),
])
def test_bad_configs_exit_2_with_one_line_and_write_nothing(tmp_path, toml, words):
    result = _nas(tmp_path, "random", toml)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("kiln: error:")
    assert not (tmp_path / "run").exists()


def test_unknown_method_and_darts_order_are_errors(tmp_path):
    assert "unknown nas method 'bayes'" in _nas(tmp_path, "bayes", "").output
    result = _nas(tmp_path, "darts", "[darts]\norder = 3")
    assert result.exit_code == 2 and "order must be 1 or 2" in result.output


def test_a_non_empty_out_dir_fails_before_any_work(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    result = _nas(tmp_path, "random", TINY)
    assert result.exit_code == 2 and "not empty" in result.output
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("method", ["darts", "random", "evolution", "rl", "spos"])
def test_every_config_round_trips_through_toml(method):
    cfg = load_config(method, None)
    assert from_dict(type(cfg), tomllib.loads(to_toml(cfg)), "rt") == cfg


def _flat(table: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in table.items():
        out |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def test_config_files_in_the_repo_load_to_exactly_what_they_say():
    """Oracle: the file itself. Every key it sets is the loaded config's value, and the config
    writes back to TOML that loads to the same config."""
    from functools import reduce
    from pathlib import Path

    paths = sorted(Path("configs/nas").glob("*.toml"))
    assert paths
    for path in paths:
        method = "spos" if "spos" in path.name else "darts" if "darts" in path.name else "random"
        cfg = load_config(method, path)
        for key, value in _flat(tomllib.loads(path.read_text())).items():
            got = reduce(getattr, key.split("."), cfg)
            assert got == (tuple(value) if isinstance(value, list) else value), (path, key)
        assert from_dict(type(cfg), tomllib.loads(to_toml(cfg)), str(path)) == cfg


def test_run_dir_rebuilds_the_found_network_with_the_reported_accuracy(tmp_path):
    """Oracle: the network rebuilt from architecture.json + model.safetensors scores exactly the
    test accuracy metrics.json reports."""
    result = _nas(tmp_path, "evolution", TINY)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    arch = json.loads((run / "architecture.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    history = json.loads((run / "history.json").read_text())
    assert arch["method"] == "evolution" and len(history) == 2
    net = discrete_network(Genotype.from_dict(arch["genotype"]), Macro(**arch["macro"]))
    load_weights(net, run / "model.safetensors")
    data = load_data("mnist", seed=0)
    assert accuracy(net, data.test) == metrics["test_accuracy"]
    assert load_config("evolution", run / "config.toml").search.max_archs == 2


def test_a_bad_genotype_record_is_an_error():
    with pytest.raises(KilnError, match="genotype"):
        Genotype.from_dict({"normal": [[["skip_connect"]]]})
    with pytest.raises(KilnError, match="reads state 5"):
        Genotype(normal=((("skip_connect", 5), ("skip_connect", 0)),), reduce=()).check()


def test_spos_run_dir_rebuilds_the_found_path_with_the_reported_accuracy(tmp_path):
    from kiln.search.nas.config import SposSpace
    from kiln.search.nas.spos import PathNet

    toml = """dataset = "mnist"
[space]
channels = 4
[supernet]
epochs = 0.1
[search]
archs = 4
bn_batches = 2
val_samples = 50
[evolution]
population = 3
sample_size = 2
[retrain]
epochs = 0.05
"""
    result = _nas(tmp_path, "spos", toml)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    arch = json.loads((run / "architecture.json").read_text())
    space = SposSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch["space"].items()})
    net = PathNet(space, tuple(arch["path"]), 1, 10)
    load_weights(net, run / "model.safetensors")
    assert accuracy(net, load_data("mnist", seed=0).test) == json.loads((run / "metrics.json").read_text())["test_accuracy"]
    assert len(json.loads((run / "history.json").read_text())) == 4

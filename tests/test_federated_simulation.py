"""Flower's simulation engine (run_simulation, ClientApps in Ray actors) against kiln's
in-process engine as the oracle: the same global parameters after 3 rounds. Slow tier: each run
starts Ray and actors that import torch and load the data."""
from __future__ import annotations

import json

import pytest
import torch

from test_federated import MODEL_RAISES, config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ATOL = 1e-6   # replies arrive in any order, so FedAvg's float32 sums may round differently


def _params(cfg, tmp_path, name, **kw):
    from kiln.federated.run import federate
    from kiln.runs.artifact import load_artifact

    metrics = federate(cfg, tmp_path / name, log=lambda s: None, **kw)
    return metrics, load_artifact(tmp_path / name).model.state_dict()


def _close(a, b):
    return all(torch.allclose(a[k], b[k], atol=ATOL, rtol=0) for k in a)


def test_flower_simulation_gives_the_in_process_parameters(tmp_path):
    flower, got = _params(config(rounds=3, engine="simulation"), tmp_path, "flower")
    local, want = _params(config(rounds=3), tmp_path, "local")
    assert _close(got, want)
    assert [h["round"] for h in flower["history"]] == [1, 2, 3]
    # the same arrays; only the metadata differs (Flower's run and node ids are 64-bit numbers
    # where the in-process engine's are small: a few bytes more per message as varints)
    for f, g in zip(flower["history"], local["history"]):
        assert 0 <= f["bytes_up"] - g["bytes_up"] < 100 * 3 and 0 <= f["bytes_down"] - g["bytes_down"] < 100 * 3
    assert flower["engine"] == "simulation"


def test_flower_simulation_interrupted_and_resumed_continues_exactly(tmp_path):
    """Ctrl-C after round 1 keeps round 1's model; --resume in Flower's engine gives a straight
    run's parameters, error-feedback residuals included (they live in the run directory)."""
    from kiln.errors import Interrupted
    from kiln.federated.run import federate
    from kiln.runs.artifact import load_artifact

    changes = dict(compression={"format": "topk", "topk_fraction": 0.05, "error_feedback": True})
    _, want = _params(config(rounds=3, **changes), tmp_path, "straight")

    def log(line):
        if line.startswith("round 1/"):
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="round 1's global model"):
        federate(config(rounds=3, engine="simulation", **changes), tmp_path / "run", log=log)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["round"] == 1
    federate(config(rounds=3, engine="simulation", **changes), tmp_path / "run", resume=True, log=lambda s: None)
    assert _close(load_artifact(tmp_path / "run").model.state_dict(), want)


def test_a_client_that_raises_in_flower_simulation_is_one_line_exit_2(tmp_path, monkeypatch):
    """flwrlabs/flower 4476: a raising ClientApp can hang Flower's simulation; here it is one line."""
    from typer.testing import CliRunner

    from kiln.cli.main import app

    (tmp_path / "m.py").write_text(MODEL_RAISES)
    (tmp_path / "fl.toml").write_text(f'model = "py:{tmp_path / "m.py"}:make"\ndataset = "mnist"\nclients = 2\n'
                                      f'rounds = 1\n[local]\nmax_steps = 1\n')
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["federate", "--config", "fl.toml", "--out", "run"])
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "raised RuntimeError: boom in local training" in last and "client " in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fl.toml", "m.py"]


def test_secagg_plus_in_flower_simulation_is_fedavg_within_its_quantization(tmp_path):
    from test_federated import _fedavg_by_hand

    from kiln.federated import secagg

    cfg = config(secagg=True, engine="simulation")
    expected = _fedavg_by_hand(cfg)
    _, got = _params(cfg, tmp_path, "run")
    worst = max(float((got[k].double() - expected[k]).abs().max()) for k in expected)
    assert 0 < worst <= secagg.bound(cfg) + 1e-7

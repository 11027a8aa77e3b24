"""Flower's deployment engine on loopback: a SuperLink and SuperNodes as real processes. Slow tier
(each message starts a `flwr-clientapp` process that imports torch and loads the data); every
test checks that no process it started is left behind."""
from __future__ import annotations

import json
import os

import pytest
import torch

from test_federated import config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _children() -> set[int]:
    from kiln.federated.deploy import descendants

    return set(descendants(os.getpid()))


def test_deployment_reproduces_the_simulation(tmp_path):
    """Oracle: the in-process simulation of the same config (same seed, same partitions)."""
    from kiln.federated.deploy import run_deployment
    from kiln.federated.run import federate
    from kiln.federated.task import federation
    from kiln.runs.artifact import load_artifact

    cfg = config(rounds=2, clients=2)
    before = _children()
    run_deployment(cfg, tmp_path / "dep", False, lambda s: None, timeout_s=900)
    assert _children() - before == set(), "leftover processes"
    federate(cfg, log=lambda s: None)
    sim = federation(cfg).model.state_dict()
    dep = load_artifact(tmp_path / "dep").model.state_dict()
    assert all(torch.allclose(sim[k], dep[k], atol=1e-6, rtol=0) for k in sim)


def test_a_killed_supernode_does_not_stop_the_federation(tmp_path):
    from kiln.federated.deploy import run_deployment

    cfg = config(rounds=2, clients=3, strategy={"min_train_clients": 2})
    before = _children()
    run_deployment(cfg, tmp_path / "run", False, lambda s: None, timeout_s=900,
                   on_round=lambda r, procs: procs.kill("supernode-2") if r == 1 else None)
    assert _children() - before == set(), "leftover processes"
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [h["round"] for h in history] == [1, 2]


def test_secagg_plus_in_a_deployment_is_fedavg_within_its_quantization(tmp_path):
    """SecAgg+ across 3 SuperNode processes: the legacy ClientApp (kiln.federated.secagg:client_app)."""
    from test_federated import _fedavg_by_hand

    from kiln.federated import secagg
    from kiln.federated.deploy import run_deployment
    from kiln.runs.artifact import load_artifact

    cfg = config(secagg=True)
    expected = _fedavg_by_hand(cfg)
    before = _children()
    run_deployment(cfg, tmp_path / "run", False, lambda s: None, timeout_s=900)
    assert _children() - before == set(), "leftover processes"
    got = load_artifact(tmp_path / "run").model.state_dict()
    worst = max(float((got[k].double() - expected[k]).abs().max()) for k in expected)
    assert 0 < worst <= secagg.bound(cfg) + 1e-7

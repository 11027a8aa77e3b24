"""Federated learning on Flower: each piece against an oracle (kiln's own fake quantization for
the wire formats, hand-computed FedAvg for a round, exact telescoping for error feedback, the
partition's own invariants, a straight run for a resumed one)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kiln.config import from_dict
from kiln.errors import KilnError
from kiln.federated import compress
from kiln.federated.config import FederateConfig, PartitionConfig, Partitioner
from kiln.quant.formats import parse_format

# the fast tier runs the apps in process; tests/test_federated_simulation.py checks that Flower's
# simulation engine gives the same parameters
TINY = {"model": "zoo:mlp", "dataset": "mnist", "rounds": 1, "clients": 3, "threads": 1, "engine": "inprocess",
        "local": {"epochs": 1, "batch_size": 16, "max_steps": 2, "lr": 0.05}}


def config(**changes) -> FederateConfig:
    table = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        if isinstance(value, dict):
            table[key] = table.get(key, {}) | value
        else:
            table[key] = value
    return from_dict(FederateConfig, table, "test")


# ---- wire formats --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["int8", "int4", "fp8_e4m3", "mxint8", "mxfp4"])
def test_decoded_update_is_kilns_fake_quantization(name):
    fmt = parse_format(name)
    u = torch.randn(7, 45) * 0.01
    wire = compress.encode({"w": u}, name, 0.01)
    back = compress.decode(wire, name, {"w": (7, 45)})["w"]
    if fmt.name == "mx":
        flat = torch.nn.functional.pad(u.reshape(-1), (0, (-u.numel()) % fmt.block))
        expected = fmt.quantize(flat)[:u.numel()].reshape(u.shape)
    else:
        expected = fmt.quantize(u, torch.tensor(float(u.abs().max()) / fmt.qmax))
    assert torch.equal(back, expected.detach())


def test_codes_take_their_bits_on_the_wire():
    u = torch.randn(1000)
    assert compress.encode({"w": u}, "int8", 0)["w|codes"].nbytes == 1000      # 255 values: 8 bits
    assert compress.encode({"w": u}, "int4", 0)["w|codes"].nbytes == 500       # 15 values: 4 bits
    codes = np.random.default_rng(0).integers(0, 2 ** 6, 333)
    assert np.array_equal(compress.unpack(compress.pack(codes, 6), 6, 333), codes)


def test_topk_keeps_the_largest_entries_exactly():
    u = torch.randn(50, 20)
    back = compress.decode(compress.encode({"w": u}, "topk", 0.01), "topk", {"w": (50, 20)})["w"]
    keep = u.abs().reshape(-1).topk(10).indices
    assert torch.equal(back.reshape(-1)[keep], u.reshape(-1)[keep])
    assert int((back != 0).sum()) == 10


def test_error_feedback_loses_nothing_over_rounds():
    """sum(sent) + residual == sum(updates): what compression drops is sent later."""
    torch.manual_seed(0)
    updates = [{"w": torch.randn(64) * 0.1} for _ in range(5)]
    residual, sent = None, torch.zeros(64)
    for u in updates:
        wire, residual = compress.compress_update(u, "topk", 0.05, residual)
        sent += compress.decode(wire, "topk", {"w": (64,)})["w"]
    total = sum(u["w"] for u in updates)
    assert torch.allclose(sent + residual["w"], total, atol=1e-6)


# ---- partitions ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(Partitioner))
def test_partitions_cover_every_row_once_and_repeat_with_the_seed(kind):
    from kiln.federated.partition import partition

    labels = np.random.default_rng(1).integers(0, 10, 600)
    cfg = PartitionConfig(kind=kind, alpha=0.3 if kind == Partitioner.DIRICHLET else 2.0, labels_per_client=2, min_size=5)
    rows = partition(labels, 8, cfg, seed=3)
    assert sorted(np.concatenate(rows).tolist()) == list(range(600)) or kind == Partitioner.PATHOLOGICAL
    assert len(set(np.concatenate(rows).tolist())) == sum(len(r) for r in rows)   # disjoint
    assert all(np.array_equal(a, b) for a, b in zip(rows, partition(labels, 8, cfg, seed=3)))
    if kind == Partitioner.PATHOLOGICAL:
        assert all(len(np.unique(labels[r])) <= 2 for r in rows)
    if kind == Partitioner.IID:
        assert max(map(len, rows)) - min(map(len, rows)) <= 1


def test_partition_refuses_more_clients_than_samples():
    from kiln.federated.partition import partition

    with pytest.raises(KilnError, match="only 5 samples"):
        partition(np.arange(5) % 2, 6, PartitionConfig(), seed=0)


@pytest.mark.parametrize("table,message", [
    ({"partition": {"kind": "shards"}}, "shards"),
    ({"strategy": {"name": "fedsgd"}}, "fedsgd"),
    ({"partition": {"alpha": 0.0}}, "alpha"),
    ({"strategy": {"bogus": 1}}, "bogus"),
])
def test_bad_tables_name_the_key(table, message):
    with pytest.raises(KilnError, match=message):
        config(**table)


def test_a_fraction_that_leaves_no_client_is_refused():
    with pytest.raises(KilnError, match="leaves no client"):
        config(strategy={"fraction_train": 0.1}).check_sampling()


# ---- a whole federation --------------------------------------------------------------------

def test_one_fedavg_round_is_the_weighted_mean_of_the_clients_local_models(tmp_path):
    """Oracle: each client trained by hand from the initial weights, averaged by sample count."""
    from kiln.federated.run import federate
    from kiln.federated.task import federation, local_train
    from kiln.runs.artifact import load_artifact

    cfg = config()
    fed = federation(cfg)
    init = {k: v.clone() for k, v in fed.model.state_dict().items()}
    expected, total = {k: torch.zeros_like(v) for k, v in init.items()}, 0
    for c in range(cfg.clients):
        fed.model.load_state_dict(init)
        local_train(fed, c, 1, init, 0.0)
        n = len(fed.rows[c])
        for k, v in fed.model.state_dict().items():
            expected[k] += v * n
        total += n
    fed.model.load_state_dict(init)
    metrics = federate(cfg, tmp_path / "run", log=lambda s: None)
    got = load_artifact(tmp_path / "run").model.state_dict()
    for k in expected:
        assert torch.allclose(got[k], expected[k] / total, atol=1e-6), k
    assert metrics["rounds"] == 1 and metrics["history"][0]["bytes_up"] > 4 * 235_146 * cfg.clients
    assert json.loads((tmp_path / "run" / "partitions.json").read_text())["sizes"] == [len(r) for r in fed.rows]


def test_int8_updates_cut_uplink_bytes_nearly_fourfold(tmp_path):
    from kiln.federated.run import federate

    plain = federate(config(), log=lambda s: None)
    int8 = federate(config(compression={"format": "int8"}), log=lambda s: None)
    assert plain["bytes_up"] / int8["bytes_up"] >= 3.9
    assert plain["bytes_down"] == int8["bytes_down"]


@pytest.mark.slow
def test_resumed_run_equals_a_straight_run(tmp_path):
    from kiln.federated.run import federate
    from kiln.runs.artifact import load_artifact

    straight = federate(config(rounds=2, strategy={"name": "fedadam"}), tmp_path / "a", log=lambda s: None)
    federate(config(rounds=1, strategy={"name": "fedadam"}), tmp_path / "b", log=lambda s: None)
    resumed = federate(config(rounds=2, strategy={"name": "fedadam"}), tmp_path / "b", resume=True, log=lambda s: None)
    a, b = load_artifact(tmp_path / "a").model.state_dict(), load_artifact(tmp_path / "b").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["after"] == straight["after"]


def test_central_dp_reports_opacus_epsilon_each_round():
    from opacus.accountants import RDPAccountant

    from kiln.federated.run import federate

    m = federate(config(rounds=2, privacy={"mode": "central", "noise_multiplier": 1.0, "clipping_norm": 0.5}),
                 log=lambda s: None)
    acc = RDPAccountant()
    for _ in range(2):
        acc.step(noise_multiplier=1.0, sample_rate=1.0)
    assert m["history"][1]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5))
    assert m["history"][0]["epsilon"] < m["history"][1]["epsilon"]


MODEL_RAISES = '''import torch
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(784, 10)
    def forward(self, x):
        if self.training:
            raise RuntimeError("boom in local training")
        return self.fc(x.flatten(1))
def make():
    return M(), (torch.randn(1, 1, 28, 28),)
'''


def test_a_client_that_raises_is_named_in_one_line_and_nothing_is_written(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kiln.cli.main import app

    (tmp_path / "m.py").write_text(MODEL_RAISES)
    (tmp_path / "fl.toml").write_text(f'model = "py:{tmp_path / "m.py"}:make"\ndataset = "mnist"\nclients = 2\n'
                                      f'rounds = 1\nengine = "inprocess"\n[local]\nmax_steps = 1\n')
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["federate", "--config", "fl.toml", "--out", "run"])
    assert result.exit_code == 2
    assert "client 0 raised RuntimeError: boom in local training" in result.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fl.toml", "m.py"]


def test_ctrl_c_keeps_the_last_completed_round_loadable(tmp_path):
    from kiln.errors import Interrupted
    from kiln.federated.run import federate
    from kiln.train.evaluation import evaluate_run

    def log(line):
        if line.startswith("round 1/"):
            raise KeyboardInterrupt   # as Ctrl-C between round 1 and round 2

    with pytest.raises(Interrupted, match="round 1's global model"):
        federate(config(rounds=3), tmp_path / "run", log=log)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["round"] == 1
    again = evaluate_run(tmp_path / "run")
    assert again["reproduced"] and again["value"] == state["history"][0]["test_accuracy"]
    resumed = federate(config(rounds=2), tmp_path / "run", resume=True, log=lambda s: None)
    assert [h["round"] for h in resumed["history"]] == [1, 2]


def test_resume_keeps_the_error_feedback_residuals(tmp_path):
    """Oracle: a straight run. The residual each client carries lives in the run directory, so
    a run stopped after round 1 and resumed gives the straight run's parameters bit for bit."""
    from kiln.federated.run import federate
    from kiln.runs.artifact import load_artifact

    ef = {"compression": {"format": "topk", "topk_fraction": 0.05, "error_feedback": True}}
    federate(config(rounds=3, **ef), tmp_path / "a", log=lambda s: None)
    federate(config(rounds=1, **ef), tmp_path / "b", log=lambda s: None)
    assert sorted(p.name for p in (tmp_path / "b" / "clients" / "0").iterdir()) == ["round-1.pt"]
    federate(config(rounds=3, **ef), tmp_path / "b", resume=True, log=lambda s: None)
    a, b = load_artifact(tmp_path / "a").model.state_dict(), load_artifact(tmp_path / "b").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "b" / "clients" / "0").iterdir()) == ["round-2.pt", "round-3.pt"]


def _fedavg_by_hand(cfg):
    """Each client trained by hand from the initial weights, averaged by sample count."""
    from kiln.federated.task import federation, local_train

    fed = federation(cfg)
    init = {k: v.clone() for k, v in fed.model.state_dict().items()}
    expected, total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in init.items()}, 0
    for c in range(cfg.clients):
        fed.model.load_state_dict(init)
        local_train(fed, c, 1, init, 0.0)
        n = len(fed.rows[c])
        for k, v in fed.model.state_dict().items():
            expected[k] += v.double() * n
        total += n
    fed.model.load_state_dict(init)
    return {k: v / total for k, v in expected.items()}


def test_secagg_plus_aggregate_is_fedavg_within_its_quantization(tmp_path):
    """Flower's SecAgg+ (masked sums of stochastically rounded, weight-scaled models): the global
    model after a round equals FedAvg's weighted mean within kiln.federated.secagg.bound (2ck/T:
    one quantization step 2c/T per client, c = 8, T = 2**22), and is not FedAvg's bit for bit."""
    from kiln.federated import secagg
    from kiln.federated.run import federate
    from kiln.runs.artifact import load_artifact

    cfg = config(secagg=True)
    expected = _fedavg_by_hand(cfg)
    metrics = federate(cfg, tmp_path / "run", log=lambda s: None)
    got = load_artifact(tmp_path / "run").model.state_dict()
    limit = secagg.bound(cfg)
    worst = max(float((got[k].double() - expected[k]).abs().max()) for k in expected)
    assert 0 < worst <= limit + 1e-7, (worst, limit)   # + float32 rounding of the stored model
    assert metrics["rounds"] == 1 and metrics["history"][0]["train_loss"] is not None


@pytest.mark.parametrize("table,message", [({"strategy": {"name": "krum"}}, "krum"),
                                           ({"compression": {"format": "int8"}}, "compressed")])
def test_secagg_refuses_what_it_cannot_aggregate(table, message):
    from kiln.federated.run import check_config

    with pytest.raises(KilnError, match=message):
        check_config(config(secagg=True, **table))


def test_lora_federation_averages_the_adapters_and_sends_only_them(tmp_path):
    """Oracle: FedAvg by hand over the whole state (the frozen base is the same everywhere, so
    its mean is itself); only the trainable tensors travel, and the run reloads as an artifact."""
    from kiln.federated.run import federate
    from kiln.lowrank.lora import LoraLinear
    from kiln.runs.artifact import load_artifact

    cfg = config(lora="r=4,alpha=8")
    expected = _fedavg_by_hand(cfg)
    metrics = federate(cfg, tmp_path / "run", log=lambda s: None)
    model = load_artifact(tmp_path / "run").model
    assert any(isinstance(m, LoraLinear) for m in model.modules())
    got = model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.allclose(got[k].double(), expected[k], atol=1e-6) for k in expected)
    adapters = sum(v.numel() for k, v in got.items() if "lora_" in k)
    assert 4 * adapters * cfg.clients <= metrics["history"][0]["bytes_up"] < 4 * adapters * cfg.clients + 20_000


def test_eval_samples_is_a_seeded_subset_of_the_test_split():
    from kiln.federated.task import federation

    fed = federation(config(eval_samples=100))
    again = federation(config(eval_samples=100, rounds=2))
    assert len(fed.splits.test) == 100 and fed.splits.test.indices == again.splits.test.indices


def test_secagg_with_a_client_that_raises_is_one_line(tmp_path):
    from kiln.federated.run import federate

    (tmp_path / "m.py").write_text(MODEL_RAISES)
    cfg = config(model=f"py:{tmp_path / 'm.py'}:make", secagg=True)
    with pytest.raises(KilnError, match="client 0 raised RuntimeError: boom in local training"):
        federate(cfg, tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run").exists()


# ---- malicious clients and the robust strategies ----------------------------------------------

def _sent_by_hand(cfg):
    """What each client sends in round 1, by hand: its local model, or for the first
    attack.clients partitions (sign flip) global - scale * (local - global); with sample counts."""
    from kiln.federated.task import federation, local_train

    fed = federation(cfg)
    init = {k: v.clone() for k, v in fed.model.state_dict().items()}
    sent = []
    for c in range(cfg.clients):
        fed.model.load_state_dict(init)
        local_train(fed, c, 1, init, 0.0)
        local = {k: v.clone() for k, v in fed.model.state_dict().items()}
        if c < cfg.attack.clients:
            local = {k: init[k] - cfg.attack.scale * (v - init[k]) for k, v in local.items()}
        sent.append((local, len(fed.rows[c])))
    fed.model.load_state_dict(init)
    return sent


def _krum_by_hand(models, f):
    """Blanchard et al. 2017: the model whose n - f - 2 nearest others (squared L2) sum least."""
    flat = np.stack([np.concatenate([m[k].double().numpy().ravel() for k in sorted(m)]) for m in models])
    dist = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    near = max(1, len(models) - f - 2)
    scores = [np.sort(np.delete(d, i))[:near].sum() for i, d in enumerate(dist)]
    return int(np.argmin(scores))


@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian", "krum"])
def test_a_sign_flip_attack_round_matches_the_strategy_by_hand(tmp_path, strategy):
    """Oracle: the clients' replies computed by hand (partition 0 flips and scales its update),
    aggregated by FedAvg's weighted mean, the coordinate-wise median, or Krum told f = the
    attack's client count (byzantine unset), which must pick an honest client's model."""
    from kiln.federated.run import federate
    from kiln.federated.server import base_strategy
    from kiln.runs.artifact import load_artifact

    cfg = config(clients=4, partition={"kind": "iid"}, strategy={"name": strategy},
                 attack={"kind": "sign_flip", "clients": 1, "scale": 4.0})
    sent = _sent_by_hand(cfg)
    federate(cfg, tmp_path / "run", log=lambda s: None)
    got = load_artifact(tmp_path / "run").model.state_dict()
    models = [m for m, _ in sent]
    if strategy == "fedavg":
        total = sum(n for _, n in sent)
        expected = {k: sum(m[k].double() * n for m, n in sent) / total for k in got}
    elif strategy == "fedmedian":
        expected = {k: torch.from_numpy(np.median(np.stack([m[k].numpy() for m in models]), axis=0)) for k in got}
    else:
        assert base_strategy(cfg).num_malicious_nodes == 1
        pick = _krum_by_hand(models, 1)
        assert pick >= cfg.attack.clients, "Krum chose the malicious client"
        expected = models[pick]
    assert all(torch.allclose(got[k].double(), expected[k].double(), atol=1e-6) for k in got)

"""Low-rank factorisation against its oracles: exact reconstruction at full rank, the
Eckart-Young error of truncated SVD, HOSVD projections for Tucker-2, exact parameter counts."""
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from kiln.errors import KilnError
from kiln.lowrank import svd, tucker
from kiln.lowrank.apply import factorize
from kiln.lowrank.config import parse_config

torch.set_num_threads(1)


@pytest.mark.parametrize("bias", [True, False])
def test_svd_at_full_rank_reproduces_the_linear(bias):
    torch.manual_seed(0)
    linear, x = nn.Linear(24, 16, bias=bias), torch.randn(7, 24)
    low = svd.factorize_linear(linear, 16)
    assert torch.allclose(low(x), linear(x), atol=1e-5)


@pytest.mark.parametrize("rank", [1, 5, 11])
def test_truncated_svd_error_is_the_discarded_singular_values_norm(rank):
    torch.manual_seed(1)
    linear = nn.Linear(20, 12)
    low = svd.factorize_linear(linear, rank)
    w_r = low.second.weight.double() @ low.first.weight.double()
    s = torch.linalg.svdvals(linear.weight.double())
    expected = s[rank:].pow(2).sum().sqrt().item()
    assert torch.linalg.matrix_norm(w_r - linear.weight.double()).item() == pytest.approx(expected, rel=1e-5)
    assert svd.truncation_error(s, rank) == pytest.approx(expected, rel=1e-12)
    assert torch.linalg.matrix_rank(w_r).item() == rank


def test_parameter_counts_by_exact_arithmetic():
    low = svd.LowRankLinear(384, 1536, 153, bias=True)
    assert sum(p.numel() for p in low.parameters()) == 153 * (384 + 1536) + 1536 == svd.svd_params(384, 1536, 153, True)
    conv = nn.Conv2d(6, 8, 3)
    t = tucker.Tucker2Conv2d(conv, (3, 4))
    assert sum(p.numel() for p in t.parameters()) == 6 * 3 + 3 * 4 * 9 + 4 * 8 + 8 == tucker.tucker2_params(conv, 3, 4)
    # half the weights of MiniLM's linears: 384*384/768 and 384*1536/1920 (floored)
    assert svd.rank_for_budget(384, 384, 0.5) == 96 and svd.rank_for_budget(384, 1536, 0.5) == 153


def test_rank_for_energy_keeps_the_smallest_sufficient_rank():
    s = torch.tensor([4.0, 3.0, 0.0])          # energies 16/25, 25/25
    assert svd.rank_for_energy(s, 0.64) == 1
    assert svd.rank_for_energy(s, 0.65) == 2
    assert svd.rank_for_energy(s, 1.0) == 2


@pytest.mark.parametrize("kw", [dict(stride=2, padding=1, padding_mode="reflect"), dict(dilation=2, bias=False),
                                dict(padding="same")])
def test_tucker2_at_full_ranks_reproduces_the_conv(kw):
    torch.manual_seed(2)
    conv, x = nn.Conv2d(5, 7, 3, **kw), torch.randn(2, 5, 11, 11)
    assert torch.allclose(tucker.factorize_conv(conv, (5, 7))(x), conv(x), atol=1e-5)


def test_truncated_tucker2_is_the_hosvd_projection():
    torch.manual_seed(3)
    conv, x = nn.Conv2d(6, 8, 3, padding=1), torch.randn(2, 6, 9, 9)
    w = conv.weight.detach().double()
    u_out = torch.linalg.svd(w.reshape(8, -1))[0][:, :3]
    u_in = torch.linalg.svd(w.transpose(0, 1).reshape(6, -1))[0][:, :2]
    projected = torch.einsum("oikl,ap,op,bq,iq->abkl", w, u_out, u_out, u_in, u_in)
    expected = F.conv2d(x.double(), projected, conv.bias.double(), padding=1)
    assert torch.allclose(tucker.factorize_conv(conv, (2, 3))(x).double(), expected, atol=1e-5)


def _toy():
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, groups=4, padding=1),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))


def test_plan_skips_what_it_cannot_factorise_and_says_why():
    cfg = parse_config({"budget": 0.5, "rules": [{"match": "type:BatchNorm2d"}, {"match": "fqn:6", "rank": 10}]})
    model, decisions, record = factorize(_toy(), cfg.plan(_toy()))
    why = {d.fqn: d.reason for d in decisions}
    assert "not supported" in why["1"] and "grouped" in why["2"] and why["6"] == "rank 10 saves no parameters"
    assert set(record["modules"]) == {"0", "4"}
    assert record["modules"]["4"] == {"type": "Linear", "rank": svd.rank_for_budget(1024, 32, 0.5)}
    x = torch.randn(2, 3, 8, 8)
    low = model.get_submodule("4")
    with FlopCounterMode(display=False) as fc:
        low(torch.randn(5, 1024))
    assert fc.get_total_flops() == 2 * 5 * low.rank * (1024 + 32)
    assert model(x).shape == (2, 10)


def test_shared_weights_stay_dense():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[1].weight = model[0].weight
    _, decisions, record = factorize(model, parse_config({"rank": 2}).plan(model))
    assert record["modules"] == {} and all("shares a weight" in d.reason for d in decisions)


@pytest.mark.parametrize("table,message", [
    ({"energy": 1.5}, "energy 1.5 is outside"),
    ({"budget": 0.5, "rank": 3}, "set only one of"),
    ({"budget": 1.0}, "budget 1.0 is outside"),
    ({"rank": 0}, "rank 0 must be"),
    ({}, "set one of budget, energy, rank"),
    ({"budget": 0.5, "bogus": 1}, "unknown key 'bogus'"),
    ({"budget": 0.5, "targets": ["Conv1d"]}, "module type 'Conv1d' is not supported"),
    ({"budget": 0.5, "rules": [{"match": "fqn:nope"}]}, "rule 'fqn:nope' matches no module"),
    ({"budget": 0.5, "finetune": {"lr": -1}}, "lr must be > 0"),
])
def test_bad_configs_are_one_line_errors(table, message):
    with pytest.raises(KilnError, match=message):
        parse_config(table).plan(_toy())


def test_cli_artifact_reloads_exactly_and_bad_input_writes_nothing(tmp_path):
    from kiln.cli.main import app
    from kiln.runs.artifact import load_artifact
    from kiln.models.spec import load

    good, bad = tmp_path / "l.toml", tmp_path / "bad.toml"
    good.write_text('energy = 0.9\n[[rules]]\nmatch = "fqn:fc"\nrank = 3\n')
    bad.write_text("energy = 2\n")
    runner = CliRunner()
    result = runner.invoke(app, ["lowrank", "zoo:cnn", "--config", str(bad), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "energy 2 is outside (0, 1]" in result.output and not (tmp_path / "x").exists()
    result = runner.invoke(app, ["lowrank", "zoo:cnn", "--config", str(good), "--out", str(tmp_path / "run"),
                                 "--no-eval", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())["report"]
    assert {r["fqn"]: r["ranks"] for r in report["layers"]}["fc"] == [3]
    assert report["params_after"] == sum(r["params_after"] for r in report["layers"]) + \
        report["params_before"] - sum(r["params_before"] for r in report["layers"])
    src = load_artifact(tmp_path / "run")
    assert isinstance(src.model.fc, svd.LowRankLinear) and src.model.fc.rank == 3
    x = torch.randn(2, 1, 28, 28)
    dense = load("zoo:cnn").model.eval()
    from kiln.lowrank.apply import factorize as again
    rebuilt, _, _ = again(dense, parse_config({"energy": 0.9, "rules": [{"match": "fqn:fc", "rank": 3}]}).plan(dense))
    assert torch.allclose(src.model(x), rebuilt.eval()(x), atol=1e-6)

"""`kiln prune` and prune_run: exact reports, artifacts that reload, schedules, and bad input
that exits 2 with one line and writes nothing."""
import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from kiln.cli.main import app
from kiln.errors import KilnError
from kiln.runs.artifact import load_artifact
from kiln.prune.config import PruneConfig, Rule, parse_config, to_table
from kiln.rules import Match
from kiln.prune.schedule import agp_ratio, lottery_ratio, rewind
from kiln.prune.unstructured import prune_unstructured

runner = CliRunner()
FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    def mlp():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        return model, (torch.randn(1, 1, 8, 8),)
''')


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "digits_mlp.py"
    path.write_text(FACTORY)
    return f"py:{path}:mlp"


def invoke(*argv):
    return runner.invoke(app, ["prune", *map(str, argv)])


def test_cli_report_counts_exact_zeros_and_flops(spec, tmp_path):
    out, js = tmp_path / "run", tmp_path / "r.json"
    result = invoke(spec, "--out", out, "--dataset", "digits", "--ratio", 0.75, "--scope", "local", "--json", js)
    assert result.exit_code == 0, result.output
    data = json.loads(js.read_text())
    weights = load_file(out / "model.safetensors")
    for row in data["report"]["layers"]:
        w = weights[row["module"] + ".weight"]
        assert row["zeros"] == int((w == 0).sum()) == round(0.75 * w.numel()) and row["total"] == w.numel()
    before, after = data["report"]["before"], data["report"]["after"]
    with FlopCounterMode(display=False) as counter:
        load_artifact(out).model(torch.randn(1, 1, 8, 8))
    assert after["flops"] == before["flops"] == counter.get_total_flops() == 2 * (64 * 32 + 32 * 10)
    # batch 1, Linear only: skipping zero weights leaves 2 FLOPs per non-zero weight
    nonzero_w = sum(int((weights[k] != 0).sum()) for k in weights if k.endswith("weight"))
    assert after["effective_flops"] == 2 * nonzero_w
    assert after["nonzero_params"] == nonzero_w + 32 + 10 and after["params"] == before["params"]
    assert data["metrics"]["metric"] == "accuracy" and 0 <= data["metrics"]["after"] <= 1
    # stored sparsely: a tensor's non-zeros at 4 bytes plus a 1-bit mask, where that is smaller
    sizes = [(int((w != 0).sum()) * 4 + -(-w.numel() // 8), 4 * w.numel()) for w in weights.values()]
    assert after["sparse_bytes"] == sum(min(s) for s in sizes) and after["dense_bytes"] == sum(d for _, d in sizes)
    again = load_artifact(out).model
    assert torch.equal(again[1].weight, weights["1.weight"])


@pytest.mark.parametrize("argv,message", [
    (["--ratio", "1.0"], "ratio 1.0 is outside [0, 1)"),
    (["--nm", "4:4"], "N:M 4:4 needs 0 < N < M"),
    (["--criterion", "l7"], "unknown pruning criterion 'l7'"),
    (["--schedule", "agp"], "schedule agp needs a [finetune] section"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(spec, tmp_path, argv, message):
    out = tmp_path / "run"
    result = invoke(spec, "--out", out, "--no-eval", *argv)
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("toml,message", [
    ('ratio = 0.5\n[[rules]]\nmatch = "fqn:nothing"\nratio = 0.2\n', "rule 'fqn:nothing' matches no module"),
    ('method = "nm"\nm = 5\n[[rules]]\nmatch = "fqn:1"\n',
     "module '1': cannot prune 2:5: input dimension 64 is not a multiple of M=5"),
    ('ratio = 0.5\nsparsity = 3\n', "unknown key 'sparsity'"),
    ('ratio = 0.5\n[finetune]\nlr = -1.0\n', "lr must be > 0"),
    ('targets = ["Lienar"]\n', "nothing to prune: no module of type Lienar"),
])
def test_bad_configs_exit_2_naming_the_problem(spec, tmp_path, toml, message):
    cfg, out = tmp_path / "p.toml", tmp_path / "run"
    cfg.write_text(toml)
    result = invoke(spec, "--out", out, "--no-eval", "--config", cfg)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_nm_skips_what_it_cannot_group_and_says_so(spec, tmp_path):
    js = tmp_path / "r.json"
    result = invoke(spec, "--out", tmp_path / "run", "--no-eval", "--nm", "2:5", "--json", js)
    assert result.exit_code == 0, result.output
    report = json.loads(js.read_text())["report"]
    assert report["skipped"] == [{"module": "1", "reason": "input dimension 64 is not a multiple of M=5"},
                                 {"module": "3", "reason": "input dimension 32 is not a multiple of M=5"}]
    assert report["layers"] == []
    result = invoke(spec, "--out", tmp_path / "run4", "--no-eval", "--nm", "1:4", "--json", js)
    assert result.exit_code == 0, result.output
    rows = json.loads(js.read_text())["report"]["layers"]
    assert [(r["module"], r["zeros"]) for r in rows] == [("1", 32 * 48), ("3", 10 * 24)]


def test_config_round_trips_and_rules_resolve_most_specific_first(spec):
    table = {"method": "unstructured", "ratio": 0.6, "scope": "local", "schedule": "agp", "agp_every": 5,
             "rules": [{"match": "type:Linear", "activation": 0.25}, {"match": "re:[13]", "ratio": 0.3},
                       {"match": "fqn:3", "skip": True}],
             "finetune": {"epochs": 1, "lr": 0.01, "distill": True}}
    cfg = parse_config(table)
    assert parse_config(to_table(cfg)) == cfg
    assert cfg.rules[2] == Rule(Match("fqn", "3"), skip=True)
    from kiln.models.spec import load

    plan = cfg.plan(load(spec).model)
    assert plan.targets == () and plan.overrides == {"1": 0.3} and plan.skipped == ("3",)
    assert plan.activations == {"1": 0.25}
    with pytest.raises(KilnError, match="finetune: unknown key 'model'"):
        parse_config({"finetune": {"model": "zoo:cnn"}})


def test_agp_and_lottery_ratios_match_hand_values():
    assert agp_ratio(5, 10, 0.0, 0.8) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)   # 0.7
    assert agp_ratio(0, 10, 0.1, 0.8) == pytest.approx(0.1) and agp_ratio(12, 10, 0.1, 0.8) == 0.8
    assert lottery_ratio(1, 2, 0.75) == pytest.approx(0.5) and lottery_ratio(2, 2, 0.75) == pytest.approx(0.75)


def test_rewind_resets_survivors_and_keeps_zeros():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    prune_unstructured(model, 0.5)
    kept = model[0].weight != 0
    rewind(model, init)
    assert torch.equal(model[0].weight[kept], init["0.weight"][kept]) and int((model[0].weight == 0).sum()) == 12
    assert torch.equal(model[0].bias, init["0.bias"])


def test_agp_finetune_with_distillation_reaches_the_exact_final_sparsity(spec, tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('ratio = 0.8\nschedule = "agp"\nagp_every = 4\nkeep_masks = true\n'
                   '[finetune]\nepochs = 1\nmax_steps = 20\nlr = 0.003\nbatch_size = 32\ndistill = true\n')
    js, out = tmp_path / "r.json", tmp_path / "run"
    result = invoke(spec, "--out", out, "--dataset", "digits", "--config", cfg, "--json", js)
    assert result.exit_code == 0, result.output
    data = json.loads(js.read_text())
    total = sum(r["total"] for r in data["report"]["layers"])
    assert sum(r["zeros"] for r in data["report"]["layers"]) == round(0.8 * total)
    assert data["metrics"]["finetune"]["distill"] and data["metrics"]["finetune"]["steps"] == 20
    # the masks were kept: training the artifact further keeps every zero
    from kiln.train.config import TrainConfig
    from kiln.train.trainer import fit

    loaded = load_artifact(out).model
    zeros = {n: loaded.get_submodule(n).weight == 0 for n in ("1", "3")}
    fit(TrainConfig(model=spec, dataset="digits", init=str(out), out=str(tmp_path / "more"), epochs=1, max_steps=5),
        progress=False)
    more = load_file(tmp_path / "more" / "last.safetensors")
    for n, z in zeros.items():
        w = more[f"{n}.parametrizations.weight.original"] * more[f"{n}.parametrizations.weight.0.mask"]
        assert bool((w[z] == 0).all())


def test_prune_config_defaults_validate():
    with pytest.raises(KilnError, match="schedule lottery applies to unstructured pruning only"):
        PruneConfig(method="nm", schedule="lottery", finetune={"epochs": 1})


CONV = textwrap.dedent('''
    import torch
    from torch import nn

    def net():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                              nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
        return model, (torch.randn(1, 1, 8, 8),)
''')


def test_structured_dispatch_writes_a_smaller_model_that_reloads(tmp_path):
    path = tmp_path / "conv.py"
    path.write_text(CONV)
    js, out = tmp_path / "r.json", tmp_path / "run"
    result = invoke(f"py:{path}:net", "--out", out, "--method", "structured", "--ratio", 0.5, "--no-eval", "--json", js)
    assert result.exit_code == 0, result.output
    report = json.loads(js.read_text())["report"]
    model = load_artifact(out).model
    assert report["after"]["params"] == sum(p.numel() for p in model.parameters()) < report["before"]["params"]
    assert model[0].out_channels == 4 and model[2].out_channels == 4 and model[5].in_features == 4 * 64
    assert {r["module"]: r["out"] for r in report["layers"]}["0"] == [8, 4]
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 1, 8, 8))
    assert report["after"]["flops"] == counter.get_total_flops()


def test_example_configs_parse_and_plan_against_the_zoo_cnn():
    from pathlib import Path

    from kiln.config import read_toml
    from kiln.models.spec import load

    configs = sorted(Path("configs/prune").glob("*.toml"))
    assert len(configs) >= 5
    parsed = {p.stem: parse_config(read_toml(p), str(p)) for p in configs}
    plan = parsed["snip-rules"].plan(load("zoo:cnn").model)
    assert plan.targets == ("features.3", "features.7", "features.10") and plan.overrides == {"features.0": 0.3}
    assert plan.skipped == ("fc",) and plan.activations == {"features.10": 0.5}


def test_lottery_rounds_reach_the_final_sparsity_from_the_init(spec, tmp_path):
    from kiln.prune.run import prune_run

    cfg = parse_config({"ratio": 0.75, "schedule": "lottery", "rounds": 2,
                        "finetune": {"epochs": 1, "max_steps": 3, "batch_size": 32}})
    result = prune_run(spec, cfg, tmp_path / "run", dataset="digits", evaluate=False, progress=False)
    layers = result["report"]["layers"]
    assert sum(r["zeros"] for r in layers) == round(0.75 * sum(r["total"] for r in layers))
    rounds = result["metrics"]["finetune"]["rounds"]
    assert [r["ratio"] for r in rounds] == pytest.approx([0.5, 0.75]) and all(r["steps"] == 3 for r in rounds)


def test_activation_sparsity_rule_survives_the_artifact(spec, tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('ratio = 0.5\n[[rules]]\nmatch = "fqn:1"\nactivation = 0.25\n')
    js = tmp_path / "r.json"
    result = invoke(spec, "--out", tmp_path / "run", "--no-eval", "--config", cfg, "--json", js)
    assert result.exit_code == 0, result.output
    assert json.loads(js.read_text())["report"]["activations"] == {"1": 0.25}
    model, seen = load_artifact(tmp_path / "run").model, {}
    model[1].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    model(torch.randn(3, 1, 8, 8))
    assert ((seen["out"] == 0).sum(1) == 8).all()    # round(0.25 * 32) zeroed per sample, before the ReLU


def test_rules_prune_at_their_own_ratio_when_the_top_level_ratio_is_zero(tmp_path):
    """Oracle: exactly round(0.5 * n) of the ruled layer's weights are zero, none elsewhere."""
    from kiln.prune.config import parse_config
    from kiln.prune.run import prune_run
    from kiln.runs.artifact import load_source

    cfg = parse_config({"ratio": 0.0, "scope": "local", "rules": [{"match": "fqn:layers.0", "ratio": 0.5}]})
    prune_run("zoo:mlp", cfg, tmp_path / "p", evaluate=False)
    model = load_source(str(tmp_path / "p")).model
    w = model.get_submodule("layers.0").weight
    assert int((w == 0).sum()) == round(0.5 * w.numel())
    assert all(int((m.weight == 0).sum()) == 0 for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "layers.0")

"""Early exit against its oracles: the backbone's own output when no sample exits, per-exit
FLOPs from kiln's graph against torch.utils.flop_counter, per-sample exits equal to the sweep's
choice from all exits' logits, and averages by exact arithmetic."""
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from kiln.adapt.config import parse_config
from kiln.adapt.early_exit import CRITERIA, EarlyExit, heads_for, probe
from kiln.adapt.sweep import Point, choose, exit_flops, exits_taken, point
from kiln.errors import KilnError

torch.set_num_threads(1)


class Block(nn.Module):
    """Residual MLP over tokens; returns a tuple like Hugging Face layers used to."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, h):
        return (h + torch.relu(self.fc(h)),)


class Tokens(nn.Module):
    """A tiny encoder on token ids with an attention mask, returning logits (like minilm_cls)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        for layer in self.layers:
            h = layer(h)[0]
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def attach(backbone, exits, args, kwargs, pool=1, **kw):
    names, shapes, classes = probe(backbone, exits, args, kwargs)
    return EarlyExit(backbone, names, heads_for(shapes, classes, pool, 0), **kw).eval()


def token_inputs(n=5):
    torch.manual_seed(1)
    mask = torch.ones(n, 7, dtype=torch.long)
    mask[0, 4:] = 0
    return torch.randint(0, 50, (n, 7)), mask


def test_a_threshold_never_passed_returns_the_backbone_output_exactly():
    backbone = cnn()
    x = torch.randn(6, 1, 12, 12)
    model = attach(backbone, ["3", "5"], (x[:1],), {}, threshold=-1.0)
    with torch.no_grad():
        assert torch.equal(model(x), backbone(x))
    assert model.last_exits.tolist() == [2] * 6
    ids, mask = token_inputs()
    tokens = Tokens().eval()
    model = attach(tokens, ["layers.0", "layers.1"], (), {"input_ids": ids[:1], "attention_mask": mask[:1]},
                   criterion="confidence", threshold=2.0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask), tokens(ids, mask))


@pytest.mark.parametrize("criterion,threshold", [("entropy", 1.33), ("confidence", 0.3)])
def test_each_sample_leaves_where_the_sweep_says_with_that_exits_logits(criterion, threshold):
    backbone = cnn()
    torch.manual_seed(2)
    x = torch.randn(16, 1, 12, 12)
    model = attach(backbone, ["3", "5"], (x[:1],), {}, criterion=criterion, threshold=threshold)
    with torch.no_grad():
        outs = model.all_exits(x)
        got = model(x)
    crit = CRITERIA.get(criterion)
    scores = torch.stack([crit.score(z) for z in outs[:-1]], 1)
    taken = exits_taken(scores, crit, threshold)
    assert 0 < len(set(taken.tolist())) and torch.equal(model.last_exits, taken)
    expected = torch.stack(outs)[taken, torch.arange(16)]
    assert torch.allclose(got, expected, atol=1e-6)


def test_with_a_threshold_it_is_scored_by_its_answers_and_while_training_by_its_loss():
    from kiln.train import tasks

    backbone = cnn()
    torch.manual_seed(3)
    x, y = torch.randn(20, 1, 12, 12), torch.randint(0, 4, (20,))
    model = attach(backbone, ["3", "5"], (x[:1],), {}, threshold=1.0)
    metric = tasks.metric_for("classification", model)
    with torch.no_grad():
        expected = (model(x).argmax(-1) == y).float().mean().item()
    assert metric.key == "accuracy"
    assert tasks.evaluate(model, "classification", [(x[:8], y[:8]), (x[8:], y[8:])], metric) == pytest.approx(expected)
    model.threshold = None                  # heads still training: the multi-exit loss picks checkpoints
    assert tasks.metric_for("classification", model).key == "loss"


def test_per_exit_flops_from_kiln_graph_match_flop_counter():
    backbone = cnn()
    x = torch.randn(1, 1, 12, 12)
    model = attach(backbone, ["2", "5"], (x,), {}, pool=2)
    flops = exit_flops(model, (x,), {})
    with FlopCounterMode(display=False) as fc:
        backbone(x)
    assert flops.backbone == fc.get_total_flops()
    for k in range(3):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.run_to(k, x)
        assert flops.per_exit[k] == fc.get_total_flops(), k
    # by hand: conv1 2*144*9*8, head0 2*(8*2*2)*4, conv2 2*36*9*8*16, head1 2*(16*2*2)*4
    assert flops.per_exit[0] == 2 * 144 * 9 * 8 + 2 * 32 * 4
    assert flops.per_exit[1] == flops.per_exit[0] + 2 * 36 * 9 * 8 * 16 + 2 * 64 * 4


def test_token_exits_flops_and_masked_pooling():
    ids, mask = token_inputs(1)
    tokens = Tokens().eval()
    kwargs = {"input_ids": ids, "attention_mask": mask}
    model = attach(tokens, ["layers.0", "layers.1"], (), kwargs)
    flops = exit_flops(model, (), kwargs)
    for k in range(3):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.run_to(k, **kwargs)
        assert flops.per_exit[k] == fc.get_total_flops(), k
    h = torch.randn(2, 7, 16)
    m = torch.tensor([[1] * 7, [1] * 3 + [0] * 4])
    head = model.heads[0]
    assert torch.allclose(head(h, m)[1], head.mlp(h[1, :3].mean(0)), atol=1e-6)


def test_loss_is_the_weighted_mean_of_exit_losses_and_a_frozen_backbone_stays_frozen():
    backbone = cnn()
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 4, (8,))
    model = attach(backbone, ["3", "5"], (x[:1],), {}, weights=[0.5, 1.0, 2.0])
    loss, _ = model.loss(x, y)
    outs = model.all_exits(x)
    expected = (0.5 * F.cross_entropy(outs[0], y) + F.cross_entropy(outs[1], y) + 2 * F.cross_entropy(outs[2], y)) / 3.5
    assert torch.allclose(loss, expected)
    model.train()
    assert not backbone.training and all(not p.requires_grad for p in backbone.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    loss, _ = model.loss(x, y)
    loss.backward()
    assert backbone[0].weight.grad is None and model.heads[0].mlp[0].weight.grad is not None


def test_point_averages_flops_by_where_each_sample_exits():
    crit = CRITERIA.get("confidence")
    scores = torch.tensor([[0.9, 0.1], [0.1, 0.2], [0.2, 0.95]])           # exits 0, final, 1 at t=0.8
    logits = torch.zeros(3, 3, 2)
    logits[0, 0, 1] = logits[2, 1, 0] = logits[1, 2, 1] = 1.0             # [exit, sample, class]: taken 1, 0, 1
    logits[2, 2, 1] = 1.0                                                  # the final exit predicts 0, 0, 1
    p = point(logits, torch.tensor([1, 0, 0]), scores, crit, 0.8, (10, 20, 30))
    assert p.avg_flops == pytest.approx((10 + 30 + 20) / 3) and p.accuracy == pytest.approx(2 / 3)
    assert p.exit_fractions == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert p.agreement == pytest.approx(2 / 3)    # sample 0 leaves with 1 where the final exit says 0


def test_choose_takes_the_cheapest_point_that_changes_few_enough_predictions():
    pts = [Point(t, acc, flops, (), agree) for t, acc, flops, agree in
           [(0.1, 0.90, 100, 1.0), (0.2, 0.91, 60, 0.99), (0.3, 0.92, 40, 0.97), (0.4, 0.5, 10, 0.6)]]
    assert choose(pts, 0.01).threshold == 0.2      # 0.3 is more accurate but changes 3% of predictions
    assert choose(pts, 0.05).threshold == 0.3
    assert choose(pts, 0.0).threshold == 0.1
    assert choose(pts, 0.0, "accuracy", reference=0.90).threshold == 0.3


@pytest.mark.parametrize("table,message", [
    ({"exits": ["3"], "bogus": 1}, "unknown key 'bogus'"),
    ({"exits": []}, "exits needs at least one"),
    ({"exits": ["3"], "criterion": "vibes"}, "unknown exit criterion 'vibes'"),
    ({"exits": ["3"], "criterion": "confidence", "threshold": 1.5}, "confidence threshold 1.5 is outside"),
    ({"exits": ["3"], "weights": [1.0]}, "weights needs 2 values"),
    ({"exits": ["3"], "select": "luck"}, "select must be one of agreement, accuracy"),
    ({"exits": ["3"], "train": {"distill": True}}, "distill does not apply"),
])
def test_bad_configs_are_one_line_errors(table, message):
    with pytest.raises(KilnError, match=message):
        parse_config(table)


def test_bad_blocks_are_errors_naming_them():
    backbone = cnn()
    x = torch.randn(1, 1, 12, 12)
    with pytest.raises(KilnError, match="no block 'nope'"):
        probe(backbone, ["nope"], (x,), {})
    shared = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    twice = nn.Sequential(shared, shared, nn.Linear(4, 2))
    with pytest.raises(KilnError, match="block '0' runs 2 times"):
        probe(twice, ["0"], (torch.randn(1, 4),), {})


def test_cli_trains_heads_sweeps_and_reloads(tmp_path):
    from kiln.cli.main import app
    from kiln.runs.artifact import load_artifact

    cfg = tmp_path / "e.toml"
    cfg.write_text('exits = ["features.2", "features.6"]\nsweep_points = 5\nlatency_samples = 3\nlatency_repeats = 1\n'
                   '[train]\nepochs = 1\nmax_steps = 2\nbatch_size = 32\n')
    runner = CliRunner()
    bad = runner.invoke(app, ["early-exit", "zoo:cnn", "--config", str(cfg), "--out", str(tmp_path / "x"), "--dataset", "nope"])
    assert bad.exit_code == 2 and not (tmp_path / "x").exists()
    result = runner.invoke(app, ["early-exit", "zoo:cnn", "--config", str(cfg), "--out", str(tmp_path / "run"),
                                 "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())["report"]
    curve = report["curve"]
    assert curve[0]["exit_fractions"][-1] == 1.0 and curve[0]["accuracy"] == report["dense"]["accuracy"]
    assert report["latency"]["exit_agreement"] == 1.0
    src = load_artifact(tmp_path / "run")
    assert isinstance(src.model, EarlyExit) and src.model.threshold == report["threshold"]
    from kiln.train.evaluation import evaluate_run

    again = evaluate_run(tmp_path / "run")     # exits taken one batch at a time, as the sweep chose
    assert again["reproduced"] and again["value"] == report["chosen"]["accuracy"]
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        src.model.threshold = -1.0
        assert torch.equal(src.model(x), src.model.backbone(x))


def test_joint_training_reaches_the_backbone():
    backbone = cnn()
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 4, (8,))
    model = attach(backbone, ["3"], (x[:1],), {}, freeze_backbone=False)
    model.train()
    assert backbone.training
    model.loss(x, y)[0].backward()
    assert backbone[0].weight.grad is not None and backbone[8].weight.grad is not None

"""Knowledge distillation and step hooks in the trainer, against hand computations."""
import math
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from kiln.config import load_toml, to_toml
from kiln.errors import KilnError
from kiln.train import tasks
from kiln.train.config import TrainConfig
from kiln.train.distill import kd_loss, loss_fn
from kiln.train.trainer import fit

FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    def plain():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        return model, (torch.randn(1, 1, 8, 8),)
''')


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "digits_plain.py"
    path.write_text(FACTORY)
    return f"py:{path}:plain"


def test_kd_loss_matches_a_hand_computation():
    # teacher logits (ln 3, 0) at T = 2: p_t = (sqrt3, 1) / (sqrt3 + 1); the student's (0, 0): p_s = (1/2, 1/2)
    student, teacher = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    r3 = math.sqrt(3.0)
    pt = (r3 / (r3 + 1), 1 / (r3 + 1))
    expected = 4 * (pt[0] * math.log(pt[0] / 0.5) + pt[1] * math.log(pt[1] / 0.5))
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # masked rows do not count: a wildly different second row changes nothing
    s2, t2 = torch.cat([student, torch.tensor([[9.0, -9.0]])]), torch.cat([teacher, torch.tensor([[-9.0, 9.0]])])
    assert kd_loss(s2, t2, 2.0, torch.tensor([True, False])).item() == pytest.approx(expected, rel=1e-6)


def test_blended_loss_is_the_weighted_sum(spec):
    torch.manual_seed(1)
    student, teacher = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    x, y = torch.randn(4, 5), torch.tensor([0, 2, 1, 2])
    cfg = TrainConfig(model=spec, teacher="given", distill_alpha=0.3, distill_temperature=3.0, label_smoothing=0.1)
    got = loss_fn(cfg, "classification", student, teacher)(student, x, y)
    s, t = student(x), teacher(x)
    kl = F.kl_div(F.log_softmax(s / 3, -1), F.log_softmax(t / 3, -1), log_target=True, reduction="batchmean")
    want = 0.7 * F.cross_entropy(s, y, label_smoothing=0.1) + 0.3 * 9 * kl
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_distilling_from_itself_with_alpha_one_leaves_the_weights_unchanged(spec, tmp_path):
    """Same init, alpha 1: the KD term is 0 with zero gradient (up to rounding), so SGD never moves."""
    cfg = TrainConfig(model=spec, dataset="digits", out=str(tmp_path / "run"), epochs=1, max_steps=3, batch_size=32,
                      optimizer="sgd", lr=0.05, weight_decay=0.0, teacher=spec, distill_alpha=1.0)
    seen = []
    fit(cfg, progress=False, hooks=[lambda model, step, total: seen.append((step, total))])
    assert seen == [(1, 3), (2, 3), (3, 3)]
    from kiln.models.spec import load

    init = load(spec).model.state_dict()
    last = load_file(tmp_path / "run" / "last.safetensors")
    assert max((init[k] - last[k]).abs().max().item() for k in init) < 1e-7
    # ... and with alpha 0 it is plain training: the weights move
    fit(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "plain"), "distill_alpha": 0.0}), progress=False)
    moved = load_file(tmp_path / "plain" / "last.safetensors")
    assert max((init[k] - moved[k]).abs().max().item() for k in init) > 1e-3


def test_config_round_trips_and_validates(spec, tmp_path):
    cfg = TrainConfig(model=spec, teacher="runs/t", distill_alpha=0.25, distill_temperature=4.0)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_toml(TrainConfig, path) == cfg
    with pytest.raises(KilnError, match="distill_alpha must be in"):
        TrainConfig(model=spec, distill_alpha=1.5)
    with pytest.raises(KilnError, match="distill_temperature must be > 0"):
        TrainConfig(model=spec, distill_temperature=0.0)


def test_a_model_with_its_own_loss_cannot_be_distilled(spec):
    class Own(torch.nn.Module):
        def loss(self, x, y):
            return x.sum(), {}

    cfg = TrainConfig(model="zoo:vae", teacher="zoo:vae")
    with pytest.raises(KilnError, match="teacher zoo:vae: distillation needs logits"):
        loss_fn(cfg, "generation", Own(), Own())
    assert tasks.logits_loss(torch.zeros(2, 4), "classification", torch.tensor([1, 2]))[0].item() == pytest.approx(math.log(4))


def test_cli_flags_reach_the_config():
    from typer.testing import CliRunner

    from kiln.cli.main import app

    result = CliRunner().invoke(app, ["train", "zoo:cnn", "--teacher", "zoo:cnn", "--distill-alpha", "1.5"])
    assert result.exit_code == 2 and "distill_alpha must be in [0, 1]" in result.output
    from kiln.cli.train import _config

    cfg = _config("zoo:cnn", None, None, {"teacher": "runs/t", "distill_alpha": 0.3, "distill_temperature": 4.0})
    assert (cfg.teacher, cfg.distill_alpha, cfg.distill_temperature) == ("runs/t", 0.3, 4.0)

"""NAS budgets hold inside candidate training, and a search says how much of it happened.

The clock in these tests is a count of optimizer steps (each SGD step costs one "second"), so
the oracle is exact arithmetic on steps, not wall time.
"""
import pytest
import torch

from kiln.search.nas import darts, run
from kiln.search.nas.config import SampledRun, SampledSearch, SpaceConfig
from kiln.search.nas.fit import Data, Deadline, Recipe, Tensors, train
from kiln.search.nas.space import CellSpace, Macro


@pytest.fixture
def step_clock(monkeypatch):
    """A clock that reads the number of SGD steps taken so far."""
    steps = [0]
    real = torch.optim.SGD.step

    def counting(self, *a, **k):
        steps[0] += 1
        return real(self, *a, **k)
    monkeypatch.setattr(torch.optim.SGD, "step", counting)
    return lambda: float(steps[0])


def tiny_data(n: int = 32, classes: int = 10) -> Data:
    gen = torch.Generator().manual_seed(0)
    split = lambda: Tensors(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, classes, (n,), generator=gen))  # noqa: E731
    return Data(split(), split(), split(), 1, classes)


def test_training_stops_at_the_deadline_between_steps(step_clock):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    stats = train(net, tiny_data().train, Recipe(epochs=10.0, batch_size=8), seed=0, deadline=Deadline(5.0, step_clock))
    assert (stats["steps"], stats["planned_steps"]) == (5, 40)


def test_a_sampled_search_keeps_its_budget_inside_a_candidate_and_reports_it(step_clock):
    # 4 steps per candidate (32 samples, batch 8, one epoch), budget 10 steps: candidates 1 and 2
    # train fully (steps 0-8), the third is cut after 2 steps, and nothing runs past step 10
    cfg = SampledRun(space=SpaceConfig(ops=("none", "skip_connect", "avg_pool_3x3"), nodes=2, channels=2, layers=1),
                     search=SampledSearch(time_budget_s=10, max_archs=100, val_samples=32,
                                          proxy=Recipe(epochs=1.0, batch_size=8)),
                     retrain=Recipe(epochs=0.25, batch_size=8))
    result = run.run_sampled("random", cfg, progress=False, data=tiny_data(), clock=step_clock)
    assert [(h["steps"], h["complete"]) for h in result.history] == [(4, True), (4, True), (2, False)]
    assert (result.search["evaluated"], result.search["complete"], result.search["train_steps"]) == (3, 2, 10)
    assert result.search["seconds"] == 10             # the search ended at its budget, to the step
    best = max(result.history[:2], key=lambda h: h["score"])["score"]
    assert result.search["best_search_score"] == best          # a cut-short candidate is never the best
    assert "only 2 candidate(s) fully trained in 10 s (1 cut short by the deadline)" in result.search["warnings"][0]


def test_darts_stops_at_its_budget_and_says_a_cell_at_chance_is_not_a_result(step_clock):
    space = CellSpace(("none", "skip_connect", "sep_conv_3x3"), nodes=2)
    settings = darts.DartsSettings(order=1, time_budget_s=3, batch_size=8, eval_samples=16)
    data = tiny_data(64)
    found = darts.search(space, Macro(channels=2, layers=2, stem_stride=1), data.train, settings, seed=0,
                         clock=step_clock)
    assert (found.steps, found.steps_per_epoch, found.planned_steps) == (3, 4, 200)
    assert found.history[-1]["step"] == 3
    warnings = run.darts_warnings(found, 0.125, 10, settings)          # 2 of 16 right: chance
    assert warnings[0].startswith("DARTS took 3 of 4 steps of one epoch")
    assert "at chance (1/10)" in warnings[1]
    assert run.darts_warnings(found, 0.5, 10, settings)[1:] == []       # 8 of 16 is no chance


@pytest.mark.parametrize("accuracy, samples, expected", [
    (0.10, 100, True), (0.16, 100, True), (0.17, 100, False),    # 0.1 + 2 * sqrt(0.1 * 0.9 / 100) = 0.16
    (0.55, 10_000, False), (0.50, 4, True), (None, 10, True)])
def test_at_chance_is_within_two_binomial_deviations_of_guessing(accuracy, samples, expected):
    classes = 2 if accuracy in (0.55, 0.50) else 10
    assert run.at_chance(accuracy, classes, samples) is expected

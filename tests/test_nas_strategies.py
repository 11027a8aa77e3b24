"""NAS sampling strategies against synthetic problems with a known optimum."""
import random

import pytest
import torch

from kiln.errors import KilnError
from kiln.search.nas import strategy as st
from kiln.search.nas.evolution import EvolutionSettings, RegularizedEvolution, mutate
from kiln.search.nas.random_search import RandomSearch
from kiln.search.nas.rl import Reinforce, RLSettings

CHOICES = [4, 3, 5, 2, 4, 3, 4, 5]
TARGET = (2, 0, 4, 1, 3, 2, 0, 1)


def matches(code, deadline=None) -> float:
    """Fraction of decisions equal to TARGET: the known optimum is TARGET, reward 1."""
    return sum(int(a == b) for a, b in zip(code, TARGET)) / len(TARGET)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_reinforce_converges_to_the_known_optimum(seed):
    strategy = Reinforce(CHOICES, seed=seed, settings=RLSettings())
    outcome = st.run(strategy, matches, budget_s=120, max_archs=1000)
    assert strategy.best_guess() == TARGET
    late = [t.reward for t in outcome.trials[-100:]]
    assert sum(late) / len(late) > 0.9


def test_regularized_evolution_reaches_the_known_optimum():
    outcome = st.run(RegularizedEvolution(CHOICES, seed=0, settings=EvolutionSettings(20, 5)),
                     matches, budget_s=60, max_archs=400)
    assert outcome.best.code == TARGET and outcome.best.reward == 1.0


def test_evolution_beats_random_on_the_same_budget():
    hits = {"evolution": 0, "random": 0}
    for seed in range(5):
        evo = st.run(RegularizedEvolution(CHOICES, seed, EvolutionSettings(20, 5)), matches, 60, 300)
        rnd = st.run(RandomSearch(CHOICES, seed), matches, 60, 300)
        hits["evolution"] += evo.best.code == TARGET
        hits["random"] += rnd.best.code == TARGET
    # 300 uniform draws from 57,600 codes find TARGET with probability ~0.5%
    assert hits["evolution"] == 5 and hits["random"] <= 1


def test_aging_removes_the_oldest_not_the_worst():
    evo = RegularizedEvolution([3, 3], seed=0, settings=EvolutionSettings(population=3, sample_size=1))
    for code, reward in (((0, 0), 9.0), ((1, 1), 0.0), ((2, 2), 0.5), ((0, 1), 0.1)):
        evo.tell(code, reward)
    assert [c for c, _ in evo.population] == [(1, 1), (2, 2), (0, 1)]


def test_mutate_changes_exactly_one_free_decision():
    rng = random.Random(0)
    for _ in range(200):
        code = tuple(rng.randrange(n) for n in CHOICES)
        child = mutate(code, CHOICES, rng)
        diff = [k for k in range(len(code)) if code[k] != child[k]]
        assert len(diff) == 1 and 0 <= child[diff[0]] < CHOICES[diff[0]]
    assert mutate((0, 0), [1, 1], rng) == (0, 0)


def test_random_search_is_uniform():
    strategy = RandomSearch([4], seed=0)
    counts = [0] * 4
    for _ in range(4000):
        counts[strategy.ask()[0]] += 1
    assert all(abs(c - 1000) < 120 for c in counts)   # ~4 sigma of a binomial(4000, 1/4)


def test_budget_stops_the_loop_and_best_is_the_max():
    outcome = st.run(RandomSearch(CHOICES, seed=1), matches, budget_s=60, max_archs=17)
    assert len(outcome.trials) == 17
    assert outcome.best.reward == max(t.reward for t in outcome.trials)


@pytest.mark.parametrize("bad", [[], [3, 0]])
def test_a_space_with_no_valid_point_is_an_error(bad):
    with pytest.raises(KilnError, match="no valid architecture"):
        RandomSearch(bad, seed=0)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(KilnError, match="sample_size"):
        EvolutionSettings(population=4, sample_size=9)
    with pytest.raises(KilnError, match="baseline_decay"):
        RLSettings(baseline_decay=1.5)


@pytest.mark.parametrize("name", st.STRATEGIES.names())
def test_strategy_conformance(name):
    """Every registered strategy: codes fit the choices, tell accepts any reward, same seed same codes."""
    import kiln.search.nas.run  # noqa: F401  (registers every strategy)

    def codes(seed):
        strategy = st.STRATEGIES.get(name)(CHOICES, seed)
        out = []
        for k in range(30):
            code = strategy.ask()
            assert len(code) == len(CHOICES) and all(0 <= c < n for c, n in zip(code, CHOICES))
            strategy.tell(code, matches(code) + (k % 3) * 0.01)
            out.append(code)
        return out
    assert codes(3) == codes(3)

"""Pareto dominance, fronts and hypervolume against exact arithmetic and Optuna's own helper."""
import random
from fractions import Fraction

import numpy as np
import pytest

from kiln.errors import KilnError
from kiln.search.pareto import dominates, front, front_indices, hypervolume

MAXMIN = ("max", "min")


def test_dominance_by_hand():
    assert dominates((0.9, 4.0), (0.8, 6.0), MAXMIN)
    assert dominates((0.9, 4.0), (0.9, 6.0), MAXMIN)         # equal in one, better in the other
    assert not dominates((0.9, 4.0), (0.9, 4.0), MAXMIN)     # equal is not dominating
    assert not dominates((0.9, 8.0), (0.8, 4.0), MAXMIN)     # a trade-off
    assert dominates((1.0, 2.0), (2.0, 3.0), ("min", "min"))


def test_front_by_hand():
    pts = [(0.80, 4.0), (0.85, 6.0), (0.84, 6.5), (0.86, 8.0), (0.70, 4.5), (0.85, 6.0)]
    assert front_indices(pts, MAXMIN) == [0, 1, 3, 5]
    assert front(pts, MAXMIN) == [(0.80, 4.0), (0.85, 6.0), (0.86, 8.0), (0.85, 6.0)]


def test_hypervolume_2d_exact():
    # reference (accuracy 0.5, 32 bits); rectangles summed by hand in exact fractions
    pts = [(0.75, 4.0), (0.875, 8.0), (0.625, 2.0), (0.5625, 16.0)]     # the last one is dominated
    ref = (0.5, 32.0)
    F = Fraction
    by_hand = (F(3, 8) * (32 - 8)            # 0.875 over [8, 32)
               + F(1, 4) * (8 - 4)           # 0.75 over [4, 8)
               + F(1, 8) * (4 - 2))          # 0.625 over [2, 4)
    assert hypervolume(pts, MAXMIN, ref) == float(by_hand)


def test_hypervolume_ignores_points_outside_the_reference_and_duplicates():
    ref = (0.5, 32.0)
    base = [(0.75, 4.0), (0.875, 8.0)]
    more = base + [(0.4, 1.0), (0.9, 40.0), (0.75, 4.0), (0.5, 2.0)]
    assert hypervolume(more, MAXMIN, ref) == hypervolume(base, MAXMIN, ref)
    assert hypervolume([], MAXMIN, ref) == 0.0


def _optuna_hv(losses: np.ndarray, ref: np.ndarray) -> float:
    from optuna._hypervolume import compute_hypervolume

    return float(compute_hypervolume(losses, ref))


@pytest.mark.parametrize("dims", [2, 3, 4])
def test_hypervolume_matches_optuna(dims):
    rng = random.Random(dims)
    for _ in range(20):
        n = rng.randint(1, 25)
        losses = [tuple(rng.random() for _ in range(dims)) for _ in range(n)]
        ref = tuple([1.1] * dims)
        mine = hypervolume(losses, ("min",) * dims, ref)
        assert mine == pytest.approx(_optuna_hv(np.array(losses), np.array(ref)), rel=1e-12, abs=1e-15)


def test_hypervolume_maximised_objectives_are_negated():
    pts = [(0.75, 4.0), (0.875, 8.0), (0.625, 2.0)]
    losses = np.array([[-a, b] for a, b in pts])
    assert hypervolume(pts, MAXMIN, (0.5, 32.0)) == pytest.approx(_optuna_hv(losses, np.array([-0.5, 32.0])))


def test_bad_directions_and_lengths():
    with pytest.raises(KilnError, match="direction"):
        dominates((1, 2), (2, 3), ("max", "smaller"))
    with pytest.raises(KilnError, match="2 values for 3 objectives"):
        hypervolume([(1, 2)], ("max", "min", "min"), (0, 0, 0))

"""Pareto dominance, the non-dominated front and its hypervolume, as pure functions.

Points are tuples of objective values; `directions` says per objective whether it is
maximised ("max") or minimised ("min"). Internally every point is turned into a loss vector
(a maximised value is negated) so that smaller is better everywhere.

The hypervolume is the measure of the region that the front dominates and that dominates the
reference point (Zitzler & Thiele 1998). In two dimensions it is a sum of rectangles over the
front sorted by the first objective; in more it is computed exactly by slicing along the last
objective (the HSO idea of While et al. 2006), which is fine for the few dozen points of a
study's front.
"""
from __future__ import annotations

from typing import Sequence

from kiln.errors import KilnError

Point = Sequence[float]
DIRECTIONS = ("max", "min")


def _check(directions: Sequence[str]) -> None:
    for d in directions:
        if d not in DIRECTIONS:
            raise KilnError(f"objective direction {d!r} is not one of {', '.join(DIRECTIONS)}")


def to_loss(point: Point, directions: Sequence[str]) -> tuple[float, ...]:
    """The point with every maximised objective negated: smaller is better in each place."""
    _check(directions)
    if len(point) != len(directions):
        raise KilnError(f"point {tuple(point)} has {len(point)} values for {len(directions)} objectives")
    return tuple(-float(v) if d == "max" else float(v) for v, d in zip(point, directions))


def _dominates_loss(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def dominates(a: Point, b: Point, directions: Sequence[str]) -> bool:
    """a is at least as good as b in every objective and strictly better in one."""
    return _dominates_loss(to_loss(a, directions), to_loss(b, directions))


def front_indices(points: Sequence[Point], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points, in input order (duplicates all stay)."""
    losses = [to_loss(p, directions) for p in points]
    return [i for i, a in enumerate(losses)
            if not any(_dominates_loss(b, a) for j, b in enumerate(losses) if j != i)]


def front(points: Sequence[Point], directions: Sequence[str]) -> list[tuple[float, ...]]:
    return [tuple(points[i]) for i in front_indices(points, directions)]


def _hv_loss(losses: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    """Exact hypervolume of loss vectors (all strictly better than `ref` in every place)."""
    if not losses:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in losses)
    if len(ref) == 2:
        total, best_y = 0.0, ref[1]
        for x, y in sorted(losses):                  # by the first objective, ascending
            if y < best_y:
                total += (ref[0] - x) * (best_y - y)
                best_y = y
        return total
    # slice along the last objective: between consecutive levels, the dominated region is the
    # (d-1)-dimensional hypervolume of the points at or below that level, times the slab height
    levels = sorted({p[-1] for p in losses}) + [ref[-1]]
    total = 0.0
    for lo, hi in zip(levels, levels[1:]):
        below = [p[:-1] for p in losses if p[-1] <= lo]
        total += _hv_loss(below, ref[:-1]) * (hi - lo)
    return total


def hypervolume(points: Sequence[Point], directions: Sequence[str], reference: Point) -> float:
    """Hypervolume of `points` against `reference` (given in the objectives' own units: e.g.
    (accuracy 0.5, 32 bits) for (max accuracy, min bits)). Points that do not strictly improve
    on the reference in every objective add nothing."""
    ref = to_loss(reference, directions)
    losses = [to_loss(p, directions) for p in points]
    inside = [p for p in losses if all(v < r for v, r in zip(p, ref))]
    keep = [p for i, p in enumerate(inside)
            if not any(_dominates_loss(q, p) or (q == p and j < i) for j, q in enumerate(inside) if j != i)]
    return _hv_loss(keep, ref)

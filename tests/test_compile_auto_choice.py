"""`--backend auto`'s choice in two rounds (kiln.compile.auto.time_and_choose), on fake backends
whose calls cost known amounts on a fake clock: the oracle is the known costs. No timed test."""
from __future__ import annotations

import itertools

import pytest

from kiln.compile import auto
from kiln.compile.auto import FINALIST_MARGIN, time_and_choose

MS = 1e-3


@pytest.fixture(autouse=True)
def no_untimed_calls(monkeypatch):
    """Every fake call is timed: the costs below are consumed one per round, in order."""
    monkeypatch.setattr(auto, "SHORT_CALL_S", 0.0)


class FakeClock:
    """A clock that only moves when a fake call spends its cost."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def call(self, costs: list[float]):
        it = itertools.chain(costs, itertools.repeat(costs[-1]))

        def fn():
            self.t += next(it)
        return fn


def _choose(costs: dict[str, list[float]], rounds: int, also=()):
    clock = FakeClock()
    calls = {k: clock.call(v) for k, v in costs.items()}
    return time_and_choose(calls, rounds, warmup=0, also=also, clock=clock, load=lambda: None)


def test_the_choice_is_the_final_rounds_fastest_and_auto_never_loses_to_a_peer_timed_beside_it():
    # zoo:vit_tiny at batch 1 (BENCHMARKS.md): the first round ranks ONNX Runtime basic first
    # and OpenVINO 7 % behind; the machine then changes, and re-timed OpenVINO is 23 % ahead
    r = 5
    costs = {"onnxruntime:level=basic": [1.106 * MS] * r + [1.139 * MS],
             "onnxruntime": [1.147 * MS] * r + [1.067 * MS],
             "openvino": [1.179 * MS] * r + [0.881 * MS],
             "inductor": [1.693 * MS] * r + [1.375 * MS],           # 53 % behind: no finalist
             "eager": [1.962 * MS] * r + [1.487 * MS]}              # no finalist either, but a peer
    first, final = _choose(costs, r, also=("eager",))
    assert first.fastest() == "onnxruntime:level=basic"
    assert set(final.timings) == {"onnxruntime:level=basic", "onnxruntime", "openvino", "eager"}
    assert final.fastest() == "openvino"
    assert final["openvino"].median == pytest.approx(0.881 * MS)
    chosen = final[final.fastest()].median
    assert all(chosen <= final[k].median for k in final.timings)          # never slower than a peer beside it
    assert final.runoff == ()                                              # 0.881 vs 1.067: not close


def test_finalists_are_those_within_the_margin_of_the_first_rounds_fastest():
    edge = 1 + FINALIST_MARGIN
    first, final = _choose({"a": [1.0 * MS], "b": [edge * 0.999 * MS], "c": [edge * 1.001 * MS]}, 3)
    assert set(final.timings) == {"a", "b"} and final.rounds == 3 and first.rounds == 3


def test_a_lone_candidate_is_timed_once():
    first, final = _choose({"a": [1.0 * MS], "b": [3.0 * MS]}, 4)
    assert final is first and first.fastest() == "a"


def test_a_close_final_round_gets_a_runoff(monkeypatch):
    # a and b within RUNOFF_MARGIN in the final round's 4 rounds (after its one warm-up call),
    # a ahead: both get 4 more rounds, and b wins on all 8
    monkeypatch.setattr(auto, "RUNOFF_MARGIN", 0.05)
    b = [1.01 * MS] * 4 + [1.02 * MS] + [1.02 * MS] * 4 + [0.98 * MS]
    first, final = _choose({"a": [1.005 * MS], "b": b}, 4)
    assert final.runoff == ("a", "b") and final.rounds == 8
    assert final.fastest() == "b" and final["b"].median == pytest.approx(1.00 * MS)

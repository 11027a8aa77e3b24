"""kiln.timing: the one timing routine, checked on a fake clock whose calls cost known amounts
(oracles: the known costs, numpy's percentiles and medians, the exact call order)."""
import itertools

import numpy as np
import pytest

from kiln.errors import KilnError
from kiln.timing import (Measurement, Timing, TimingConfig, best_of, format_timing, is_bimodal, is_contended,
                         measure, percentile)

NO_LOAD = lambda: None  # noqa: E731


class FakeClock:
    """A clock that only moves when a fake call spends its cost."""

    def __init__(self):
        self.t = 0.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.t

    def call(self, name: str, costs):
        """A call named `name` costing the next of `costs` (cycled) seconds each time."""
        it = itertools.cycle(costs)

        def fn():
            self.log.append(name)
            self.t += next(it)
        return fn


def timed(costs: dict, config: TimingConfig, load=NO_LOAD) -> tuple[Measurement, FakeClock]:
    clock = FakeClock()
    m = measure({k: clock.call(k, v) for k, v in costs.items()}, config, clock=clock, load=load)
    return m, clock


def test_percentile_matches_numpy():
    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4, 0.05]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_rounds_interleave_the_candidates_after_a_warm_up():
    # 0.1 s calls are long: no untimed calls between the timed ones; each round starts one further
    m, clock = timed({"a": [0.1], "b": [0.2], "c": [0.3]}, TimingConfig(rounds=4, warmup=2, short_call_s=0.05))
    assert clock.log == ["a", "b", "c"] * 2 + list("abc" "bca" "cab" "abc")
    assert [m[k].n for k in "abc"] == [4, 4, 4] and m.rounds == 4
    m, clock = timed({"a": [0.1], "b": [0.2]}, TimingConfig(rounds=3, warmup=0, rotate=False))
    assert clock.log == list("ababab")                  # a graph pass keeps its order


def test_a_short_call_gets_an_untimed_call_before_each_timed_one():
    m, clock = timed({"a": [0.01], "b": [0.2]}, TimingConfig(rounds=3, warmup=1, short_call_s=0.05, rotate=False))
    assert clock.log == ["a", "b"] + ["a", "a", "b"] * 3
    assert m["a"].samples == pytest.approx((0.01,) * 3)      # the untimed calls are not in the samples


def test_statistics_are_those_of_the_known_costs():
    costs = [0.013, 0.011, 0.012, 0.015, 0.014, 0.012, 0.016]
    m, _ = timed({"a": costs, "b": [0.02]}, TimingConfig(rounds=7, warmup=0, short_call_s=0))
    a = m["a"]
    assert a.samples == pytest.approx(tuple(costs))
    assert a.median == pytest.approx(np.median(costs)) and a.min == pytest.approx(0.011)
    assert a.p90 == pytest.approx(np.percentile(costs, 90))
    assert a.spread == pytest.approx((np.percentile(costs, 90) - 0.011) / np.median(costs))
    assert m.fastest() == "a" and m.speedup("b", "a") == pytest.approx(0.02 / np.median(costs))
    assert not m.contended and m.note() == "" and not m.remeasured
    assert a.per(4).median == pytest.approx(np.median(costs) / 4)


def test_two_modes_or_a_wide_tail_are_contended_and_one_outlier_is_not():
    quiet = [1.0 + 0.01 * i for i in range(20)]
    assert not is_contended(quiet) and not is_bimodal(quiet)
    assert not is_contended([1.0] * 19 + [100.0])            # one slow call in 20: p90 is still quiet
    two = [1.5] * 15 + [140.0] * 5                            # the prune runs' 1.5 ms vs 140 ms
    assert is_bimodal(two) and is_contended(two)
    assert is_contended([1.0, 1.2, 1.5, 1.8, 2.2, 2.6, 3.0, 3.5, 4.0, 4.5])   # no gap, but p90 > 2x min
    assert not is_contended([1.0, 100.0, 1.0])                # too few samples to judge


def test_a_contended_try_is_measured_again_and_the_clean_one_kept():
    # a's first 10 calls alternate 1 ms and 100 ms (contended); from then on 1 ms
    a_costs = [0.001, 0.1] * 5 + [0.001] * 10
    m, _ = timed({"a": a_costs, "b": [0.002]}, TimingConfig(rounds=10, warmup=0, short_call_s=0))
    assert m.remeasured and not m.contended and m["a"].median == pytest.approx(0.001)
    assert m.note() == ""


def test_still_contended_after_measuring_again_is_flagged():
    m, _ = timed({"a": [0.001, 0.1], "b": [0.002]}, TimingConfig(rounds=10, warmup=0, short_call_s=0))
    assert m.remeasured and m.contended == ("a",) and m["a"].contended
    assert "contended" in m.note() and "even after measuring again" in m.note()
    assert format_timing(m["a"]).endswith(" contended")
    assert not TimingConfig(remeasure=False).remeasure


def test_a_close_call_gets_a_runoff_and_the_choice_stands_on_all_rounds():
    # b is slower in the first 5 rounds and faster in the next 5: the choice flips on all 10
    b_costs = [0.0104] * 5 + [0.0096] * 5
    cfg = TimingConfig(rounds=5, warmup=0, short_call_s=0, runoff_margin=0.05)
    m, _ = timed({"a": [0.010], "b": b_costs, "c": [0.030]}, cfg)
    assert m.runoff == ("a", "b") and m.rounds == 10 and [m[k].n for k in "abc"] == [10, 10, 10]
    assert m["b"].median == pytest.approx(np.median(b_costs)) and m.fastest() == "b"
    far, _ = timed({"a": [0.010], "b": [0.020]}, cfg)
    assert far.runoff == () and far.rounds == 5
    off, _ = timed({"a": [0.010], "b": b_costs}, TimingConfig(rounds=5, warmup=0, short_call_s=0))
    assert off.runoff == () and off.fastest() == "a"


def test_other_processes_taking_the_cpus_mark_the_machine_busy(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("torch.get_num_threads", lambda: 2)
    # every probe: the machine spent 1.8 more busy CPU seconds, this process 0.2 (fake clock: 1 s a try)
    counters = iter([(0.0, 0.0), (1.8, 0.2), (1.8, 0.2), (3.6, 0.4)])
    m, _ = timed({"a": [0.1]}, TimingConfig(rounds=10, warmup=0, short_call_s=0), load=lambda: next(counters))
    assert m.others_cpu == pytest.approx(0.8) and m.busy and m.remeasured
    assert "machine busy: other processes took 80% of 2 CPUs even after measuring again" == m.note()
    quiet = iter([(0.0, 0.0), (0.3, 0.2)])
    q, _ = timed({"a": [0.1]}, TimingConfig(rounds=10, warmup=0, short_call_s=0), load=lambda: next(quiet))
    assert q.others_cpu == pytest.approx(0.05) and not q.busy and not q.remeasured


def test_best_of_stops_when_the_best_stops_improving():
    clock = FakeClock()
    costs = [0.5, 0.4, 0.3, 0.2] + [0.25] * 100               # (the first call is the warm-up)
    t, settled = best_of(clock.call("mm", costs), min_calls=3, patience=4, budget_s=100, clock=clock)
    assert settled and t.min == pytest.approx(0.2) and t.n == 3 + 4    # 0.4 0.3 0.2, then 4 without a gain
    clock = FakeClock()
    falling = [1.0 / (i + 1) for i in range(1000)]             # always improving: the budget stops it
    t, settled = best_of(clock.call("mm", falling), patience=4, budget_s=1.0, clock=clock)
    assert not settled and sum(t.samples) >= 1.0 and sum(t.samples[:-1]) < 1.0
    clock = FakeClock()
    busy = [0.1, 0.1, 0.5, 0.5, 0.5]                           # flat best, but 3 in 5 calls contended
    t, settled = best_of(clock.call("mm", busy), min_calls=3, patience=4, budget_s=5.0, clock=clock)
    assert not settled and t.contended and clock.t >= 5.0  # kept trying for a quiet slice until the bound


def test_format_timing_prints_the_figure_with_its_spread():
    t = Timing("a", (0.0121, 0.0123, 0.0123, 0.0125, 0.0131), 2)
    # median 12.3, p90 = 12.5 + 0.6 * (13.1 - 12.5) = 12.86
    assert format_timing(t) == "12.3 ms (min 12.1, p90 12.9)"
    assert format_timing(t.to_dict()) == format_timing(t)
    assert format_timing(Timing("a", (2e-5,) * 5, 1)) == "20 us (min 20, p90 20)"


def test_bad_config_and_nothing_to_measure_are_errors():
    with pytest.raises(KilnError, match="rounds >= 1"):
        TimingConfig(rounds=0)
    with pytest.raises(KilnError, match="nothing to measure"):
        measure({})

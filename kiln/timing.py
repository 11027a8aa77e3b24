"""The one timing routine: every latency kiln measures goes through `measure` (or `best_of`
for a peak), so every figure has the same warm-up, interleaving, statistics and checks.

Why interleaved: candidates timed one after another each see the machine in a different
state; timed in rounds (A B C A B C ...) a slow spell lands on all of them alike, so their
ratio holds even when the absolute figures drift.

Why the contention check: on a shared machine a figure can swing 100x. Two OpenMP threads on
two shared cores that lose their time slice inside a spinning barrier turned a 1.5 ms forward
into 140 ms (kiln prune printed `1.519 -> 140.005 ms` and `152.070 -> 0.971 ms` for the same
models). Such a measurement shows as two modes or a p90 far above the fastest call; kiln
measures once more and, when the second try is no cleaner, flags the figure `contended`
instead of printing it as if it were clean.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from kiln.errors import KilnError

Clock = Callable[[], float]
# (CPU seconds every process has spent busy, CPU seconds this process has spent), or None
LoadProbe = Callable[[], "tuple[float, float] | None"]

# p90 more than this many times the fastest call: the calls did not all see one machine
CONTENDED_RATIO = 2.0
# sorted samples with a jump of this factor between neighbours, with at least BIMODAL_SHARE of
# them on each side, come from two machine states (a quiet one and a contended one)
BIMODAL_GAP = 2.0
BIMODAL_SHARE = 0.1
# fewer samples than this say too little about their own distribution to be judged
MIN_TO_JUDGE = 5
# other processes leaving us this much less than a core per thread: the machine is busy
BUSY_SLACK_CORES = 0.25
# /proc/stat counts in clock ticks (100 Hz): a shorter window cannot resolve the load
MIN_LOAD_WINDOW_S = 0.25


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile by linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def is_bimodal(samples: Sequence[float]) -> bool:
    """Whether the sorted samples split in two groups, each of at least BIMODAL_SHARE of them,
    with a jump of BIMODAL_GAP or more between the groups."""
    s = sorted(samples)
    if len(s) < MIN_TO_JUDGE or s[0] <= 0:
        return False
    least = max(1, int(BIMODAL_SHARE * len(s) + 0.999))
    return any(s[i] >= BIMODAL_GAP * s[i - 1] for i in range(least, len(s) - least + 1))


def is_contended(samples: Sequence[float]) -> bool:
    """Two modes, or a p90 CONTENDED_RATIO times the fastest call or more."""
    if len(samples) < MIN_TO_JUDGE or min(samples) <= 0:
        return False
    return is_bimodal(samples) or percentile(samples, 90) >= CONTENDED_RATIO * min(samples)


@dataclass(frozen=True)
class Timing:
    """One candidate's samples (seconds per call, in the order taken) and their statistics."""

    name: str
    samples: tuple[float, ...]
    threads: int

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p90(self) -> float:
        return percentile(self.samples, 90)

    @property
    def spread(self) -> float:
        """(p90 - min) / median: the width of the typical samples, relative to the figure."""
        return (self.p90 - self.min) / self.median

    @property
    def contended(self) -> bool:
        return is_contended(self.samples)

    def per(self, k: int) -> "Timing":
        """The same samples divided by k: a call that ran k samples, per sample."""
        return Timing(self.name, tuple(s / k for s in self.samples), self.threads)

    def to_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "p90_s": self.p90, "spread": self.spread,
                "samples": self.n, "threads": self.threads, "contended": self.contended}


@dataclass(frozen=True)
class TimingConfig:
    """rounds: timed calls per candidate; warmup: untimed calls of each first; a call shorter
    than short_call_s gets one untimed call before its timed one in every round (caches and
    thread pools come back from the previous candidate); remeasure: measure once more when the
    first try is contended; runoff_margin > 0: when the two fastest medians are closer than
    this (relative), every candidate gets `rounds` more rounds and the choice stands on all;
    rotate: round r starts at the r-th candidate (A B C, B C A, C A B), because a call timed
    right after another model's reads slower (its activations in the caches): in a fixed order
    one of two identical pruned models, always after the dense one, read 1-5% slower."""

    rounds: int = 20
    warmup: int = 3
    short_call_s: float = 0.05
    remeasure: bool = True
    runoff_margin: float = 0.0
    rotate: bool = True

    def __post_init__(self):
        if self.rounds < 1 or self.warmup < 0 or self.short_call_s < 0 or self.runoff_margin < 0:
            raise KilnError(f"timing: need rounds >= 1, warmup >= 0, short_call_s >= 0, runoff_margin >= 0; got "
                            f"{self.rounds}, {self.warmup}, {self.short_call_s}, {self.runoff_margin}")


@dataclass(frozen=True)
class Measurement:
    """Every candidate's Timing, measured interleaved in one call, and how the machine was."""

    timings: dict[str, Timing]
    rounds: int                    # timed calls of every candidate, the runoff's included
    remeasured: bool               # the first try was contended or the machine busy
    runoff: tuple[str, ...]        # the close pair that earned more rounds, if any
    others_cpu: float | None       # share of the machine's CPU time other processes took
    cpus: int

    def __getitem__(self, name: str) -> Timing:
        return self.timings[name]

    def fastest(self) -> str:
        return min(self.timings, key=lambda k: self.timings[k].median)

    def speedup(self, before: str, after: str) -> float:
        """before's median over after's: > 1 when `after` is faster."""
        return self.timings[before].median / self.timings[after].median

    @property
    def threads(self) -> int:
        return next(iter(self.timings.values())).threads

    @property
    def busy(self) -> bool:
        return is_busy(self.others_cpu, self.cpus, self.threads)

    @property
    def contended(self) -> tuple[str, ...]:
        return tuple(k for k, t in self.timings.items() if t.contended)

    def note(self) -> str:
        """'' for a clean measurement, else one line saying what to distrust."""
        parts = []
        if self.contended:
            names = self.contended
            listed = ", ".join(names) if len(names) <= 3 else f"{len(names)} of {len(self.timings)}: " + \
                ", ".join(names[:3]) + ", ..."
            parts.append(f"contended (p90 >= {CONTENDED_RATIO:g}x min, or two modes): {listed}")
        if self.busy:
            parts.append(f"machine busy: other processes took {self.others_cpu:.0%} of {self.cpus} CPUs")
        return "; ".join(parts) + (" even after measuring again" if parts and self.remeasured else "")

    def to_dict(self) -> dict:
        return {"timings": {k: t.to_dict() for k, t in self.timings.items()}, "rounds": self.rounds,
                "remeasured": self.remeasured, "runoff": list(self.runoff), "others_cpu": self.others_cpu,
                "cpus": self.cpus, "busy": self.busy, "note": self.note()}


def is_busy(others_cpu: float | None, cpus: int, threads: int) -> bool:
    """Other processes left fewer free cores than there were threads measuring."""
    return others_cpu is not None and cpus * (1 - others_cpu) < threads - BUSY_SLACK_CORES


def others_share(before, after, wall_s: float, cpus: int) -> float | None:
    """The share of the machine's CPU time that other processes took between two cpu_counters()
    readings `wall_s` apart; None when a reading is missing or the window too short to resolve."""
    if before is None or after is None or wall_s < MIN_LOAD_WINDOW_S:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return min(max(others / (wall_s * cpus), 0.0), 1.0)


def cpu_counters() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine since boot, CPU seconds of this process and its
    finished children: a timed subprocess or compile worker is not "another process"); None
    where /proc/stat is missing (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal: busy is all but idle and iowait
    ticks = [int(v) for v in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system + own.children_user + own.children_system


def measure(calls: Mapping[str, Callable[[], object]], config: TimingConfig = TimingConfig(), *,
            clock: Clock = time.perf_counter, load: LoadProbe = cpu_counters) -> Measurement:
    """Time each named call in interleaved rounds after a warm-up (under no_grad); measure once
    more when the first try is contended or the machine busy; run off a close call."""
    if not calls:
        raise KilnError("timing: nothing to measure")
    threads = torch.get_num_threads()
    with torch.no_grad():
        # the warm-up's last call of each says whether its first round needs an untimed call
        warm: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(config.warmup):
            for name, fn in calls.items():
                t0 = clock()
                fn()
                warm[name][:] = [clock() - t0]
        tries = [_try(calls, config, clock, load, warm)]
        if config.remeasure and _suspect(tries[0], threads):
            tries.append(_try(calls, config, clock, load, warm))
        samples, others = min(tries, key=lambda t: _badness(t, threads))
        ranked = sorted(samples, key=lambda k: statistics.median(samples[k]))
        runoff: tuple[str, ...] = ()
        if config.runoff_margin and len(ranked) > 1 and \
                statistics.median(samples[ranked[1]]) < statistics.median(samples[ranked[0]]) * (1 + config.runoff_margin):
            runoff = (ranked[0], ranked[1])
            _rounds(calls, config, clock, samples, samples)
    return Measurement({k: Timing(k, tuple(v), threads) for k, v in samples.items()},
                       len(next(iter(samples.values()))), len(tries) > 1, runoff, others, os.cpu_count() or 1)


def _rounds(calls: Mapping[str, Callable[[], object]], config: TimingConfig, clock: Clock,
            samples: dict[str, list[float]], last: dict[str, list[float]]) -> None:
    """`rounds` interleaved rounds appended to `samples`; `last` holds each call's previous time."""
    names = list(calls)
    done = len(samples[names[0]])        # a runoff goes on with the rotation where it stopped
    for r in range(done, done + config.rounds):
        shift = r % len(names) if config.rotate else 0
        for name in names[shift:] + names[:shift]:
            fn = calls[name]
            previous = samples[name] or last[name]
            if previous and previous[-1] < config.short_call_s:
                fn()
            t0 = clock()
            fn()
            samples[name].append(clock() - t0)


def _try(calls, config: TimingConfig, clock: Clock, load: LoadProbe,
         warm: dict[str, list[float]]) -> tuple[dict[str, list[float]], float | None]:
    """One interleaved measurement: the samples, and the share of the CPUs others took meanwhile."""
    samples: dict[str, list[float]] = {k: [] for k in calls}
    before, t0 = load(), clock()
    _rounds(calls, config, clock, samples, warm)
    after, wall = load(), clock() - t0
    return samples, others_share(before, after, wall, os.cpu_count() or 1)


def _judged(attempt, threads: int) -> Measurement:
    samples, others = attempt
    return Measurement({k: Timing(k, tuple(v), threads) for k, v in samples.items()}, 0, False, (), others,
                       os.cpu_count() or 1)


def _suspect(attempt, threads: int) -> bool:
    m = _judged(attempt, threads)
    return bool(m.contended) or m.busy


def _badness(attempt, threads: int) -> tuple:
    """Order of preference between tries: fewer contended candidates, not busy, narrower."""
    m = _judged(attempt, threads)
    return len(m.contended), m.busy, max(t.p90 / t.min if t.min > 0 else 1.0 for t in m.timings.values())


def best_of(fn: Callable[[], object], *, min_calls: int = 5, patience: int = 5, tolerance: float = 0.01,
            budget_s: float = 10.0, clock: Clock = time.perf_counter) -> tuple[Timing, bool]:
    """The fastest a call gets, for a peak (a maximum, not a typical figure): call it (after one
    warm-up) until `patience` calls in a row come no faster than the best so far by more than
    `tolerance` (relative) while the samples are not contended (a busy machine may yet give a
    quiet slice), or until `budget_s` of calls are spent. (samples, whether it settled)."""
    fn()
    times: list[float] = []
    since_best, start = 0, clock()
    while True:
        t0 = clock()
        fn()
        t = clock() - t0
        improved = not times or t < min(times) * (1 - tolerance)
        times.append(t)
        since_best = 0 if improved else since_best + 1
        if len(times) >= min_calls and since_best >= patience and not is_contended(times):
            return Timing("best_of", tuple(times), torch.get_num_threads()), True
        if clock() - start >= budget_s:
            return Timing("best_of", tuple(times), torch.get_num_threads()), False


def _unit(value: float) -> tuple[float, str]:
    if value >= 1:
        return 1.0, "s"
    if value >= 1e-3:
        return 1e3, "ms"
    return 1e6, "us"


def format_timing(t: "Timing | dict") -> str:
    """'12.3 ms (min 12.1, p90 12.9)', with ' contended' when the samples are; `t` a Timing or
    its to_dict() (a report read back from JSON)."""
    d = t.to_dict() if isinstance(t, Timing) else t
    scale, unit = _unit(d["median_s"])
    text = f"{d['median_s'] * scale:.3g} {unit} (min {d['min_s'] * scale:.3g}, p90 {d['p90_s'] * scale:.3g})"
    return text + (" contended" if d.get("contended") else "")

"""The alpha-beta model of collective communication: time = steps * alpha + volume / bandwidth.

Formulas (n processes, S bytes of payload, alpha the per-step latency, B the per-process link
bandwidth in one direction), from Thakur, Rabenseifner and Gropp, "Optimization of Collective
Communication Operations in MPICH" (IJHPCA 2005), and nccl-tests' bus-bandwidth definition
(doc/PERFORMANCE.md: busbw = algbw * 2(n-1)/n for all-reduce, (n-1)/n for all-gather and
reduce-scatter):
- ring all-reduce        2(n-1) alpha + 2(n-1)/n * S/B   (reduce-scatter then all-gather)
- tree all-reduce        2 ceil(log2 n) (alpha + S/B)    (binomial reduce then broadcast)
- ring all-gather        (n-1) alpha + (n-1)/n * S/B     (S: the gathered, full size)
- ring reduce-scatter    (n-1) alpha + (n-1)/n * S/B     (S: the full input size)
- broadcast (binomial)   ceil(log2 n) (alpha + S/B)
- point-to-point         alpha + S/B
A calibrated backend (gloo here) keeps these step counts and bus factors but gets its own
per-step latency and per-process bandwidth for each collective and process count, measured
(`Fitted`), because gloo's collectives are not equally good implementations of the formulas
(its reduce-scatter runs one all-reduce per rank: pytorch PR 149869).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Collective(enum.Enum):
    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    BROADCAST = "broadcast"
    P2P = "p2p"


class Algorithm(enum.Enum):
    RING = "ring"
    TREE = "tree"


@dataclass(frozen=True)
class Link:
    """One hop: latency per step (s) and bandwidth per process in one direction (bytes/s)."""

    latency_s: float
    bandwidth: float


def steps(op: Collective, n: int, algorithm: Algorithm = Algorithm.RING) -> int:
    """Latency terms of one collective among n processes."""
    if n <= 1:
        return 0
    log = math.ceil(math.log2(n))
    if op is Collective.ALL_REDUCE:
        return 2 * (n - 1) if algorithm is Algorithm.RING else 2 * log
    if op in (Collective.ALL_GATHER, Collective.REDUCE_SCATTER):
        return n - 1
    return log if op is Collective.BROADCAST else 1


def bus_factor(op: Collective, n: int, algorithm: Algorithm = Algorithm.RING) -> float:
    """Bytes each process sends per payload byte (nccl-tests' algbw -> busbw factor)."""
    if n <= 1:
        return 0.0
    if op is Collective.ALL_REDUCE:
        return 2 * (n - 1) / n if algorithm is Algorithm.RING else 2 * math.ceil(math.log2(n))
    if op in (Collective.ALL_GATHER, Collective.REDUCE_SCATTER):
        return (n - 1) / n
    return math.ceil(math.log2(n)) if op is Collective.BROADCAST else 1.0


def collective_time(op: Collective, size: float, n: int, link: Link,
                    algorithm: Algorithm = Algorithm.RING) -> float:
    """Seconds for one collective of `size` bytes among n processes over `link`."""
    if n <= 1 and op is not Collective.P2P:
        return 0.0
    return steps(op, n, algorithm) * link.latency_s + bus_factor(op, n, algorithm) * size / link.bandwidth


def best_all_reduce(size: float, n: int, link: Link) -> tuple[float, Algorithm]:
    """The faster of ring and tree, as NCCL's tuner chooses per message size."""
    ring = collective_time(Collective.ALL_REDUCE, size, n, link, Algorithm.RING)
    tree = collective_time(Collective.ALL_REDUCE, size, n, link, Algorithm.TREE)
    return (ring, Algorithm.RING) if ring <= tree else (tree, Algorithm.TREE)


@dataclass(frozen=True)
class Fitted:
    """A calibrated collective at one process count, as its algorithm's alpha-beta cost:
    t = steps(op, n) * latency_s + bus_factor(op, n) * S / bus_bandwidth, with latency_s the
    cost of one of the algorithm's steps (ring all-reduce: 2(n-1) of them, all-gather and
    reduce-scatter n-1, binomial broadcast ceil(log2 n), point-to-point 1) and bus_bandwidth the
    bytes per second one process moves. A second (latency, bandwidth) pair holds for messages up
    to `split_bytes`: a message that stays in a core's cache moves at another rate than one that
    does not (and backends switch algorithm with the size: NCCL's LL and Simple protocols)."""

    processes: int
    latency_s: float
    bus_bandwidth: float
    split_bytes: float = 0.0
    small_latency_s: float = 0.0
    small_bus_bandwidth: float = 0.0

    def pair(self, size: float) -> tuple[float, float]:
        if self.split_bytes and size <= self.split_bytes:
            return self.small_latency_s, self.small_bus_bandwidth
        return self.latency_s, self.bus_bandwidth

    def time(self, op: Collective, size: float, n: int | None = None) -> float:
        """Seconds at n processes (default: the calibrated count): the step count and the bus
        factor follow n, the per-step latency and the per-process bandwidth stay."""
        n = self.processes if n is None else n
        latency, bandwidth = self.pair(size)
        return steps(op, n) * latency + bus_factor(op, n) * size / bandwidth


def fitted_time(op: Collective, size: float, n: int, fits: tuple[Fitted, ...]) -> float:
    """A calibrated collective's time at n processes: the fit at n, else the nearest fit's
    per-step latency and per-process bandwidth with n's step count and bus factor."""
    if n <= 1 and op is not Collective.P2P:
        return 0.0
    near = min(fits, key=lambda f: (abs(f.processes - n), -f.processes))
    return near.time(op, size, n)


def fit_latency_bandwidth(op: Collective, n: int, sizes: list[float], times: list[float]) -> Fitted:
    """Least squares of relative error for t = steps * a + bus_factor * S * b over measured
    (S, t): every size weighs alike, so the 1 KB and the 128 MB points both count. Returns the
    per-step latency a and the bus bandwidth 1/b."""
    k, m = bus_factor(op, n), max(steps(op, n), 1)
    # minimise sum(((m a + x b) - t)/t)^2: weighted linear least squares in (m a, b), weights 1/t^2
    w = [1 / t ** 2 for t in times]
    x = [k * s for s in sizes]
    sw, sx, sxx = sum(w), sum(wi * xi for wi, xi in zip(w, x)), sum(wi * xi * xi for wi, xi in zip(w, x))
    st, sxt = sum(wi * t for wi, t in zip(w, times)), sum(wi * xi * t for wi, xi, t in zip(w, x, times))
    det = sw * sxx - sx * sx
    b = (sw * sxt - sx * st) / det
    a = (st - sx * b) / sw
    if b <= 0:   # flat times: all latency; bandwidth from the largest point alone
        b = max(times[-1] - min(times), 1e-12) / max(x[-1], 1)
    if a < 0:    # no latency to speak of: the bandwidth alone, through the points
        a, b = 0.0, sum(wi * xi * t for wi, xi, t in zip(w, x, times)) / sxx
    return Fitted(n, a / m, 1 / b)

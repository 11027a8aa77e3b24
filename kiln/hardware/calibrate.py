"""Measure this machine's peak matmul FLOP/s and memory bandwidth into a HardwareProfile.

A peak is a maximum: each figure comes from the fastest call, and calls go on until the best
stops improving (kiln.timing.best_of) or the time bound is spent. A median of 5 calls on a
machine busy for a few seconds once saved 46.5 GFLOP/s for fp32 where a quiet run reads
about 330; rooflines built on it then read 191-346% "efficiency". So the calibration also
watches the machine: other processes' CPU time while it ran, the load average before it
started, and each figure's spread; `warnings()` says what it saw.
"""
from __future__ import annotations

import datetime
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable

import torch

from kiln.hardware.profiles import HardwareProfile, peak_unit
from kiln.timing import Timing, best_of, cpu_counters, is_busy, others_share

# the fastest call more than this far above the median: the calls did not all get the machine
WIDE_SPREAD = 0.25


@dataclass(frozen=True)
class Peak:
    """One figure: `work` (FLOPs, OPs or bytes) per call over the fastest call's seconds."""

    key: str
    work: float
    timing: Timing
    settled: bool            # the best stopped improving before the time bound

    @property
    def value(self) -> float:
        return self.work / self.timing.min

    @property
    def typical(self) -> float:
        """The rate of the median call."""
        return self.work / self.timing.median

    @property
    def spread(self) -> float:
        """How far the best call is above the median one (0.05: 5%)."""
        return self.value / self.typical - 1

    def describe(self) -> str:
        how = "settled" if self.settled else "still improving at the time bound"
        return f"best of {self.timing.n} calls ({how}; median call {self.spread:.0%} slower)"


@dataclass(frozen=True)
class Calibration:
    profile: HardwareProfile
    peaks: dict[str, Peak]         # fp32, bf16, int8 (where it ran), memory_bandwidth
    others_cpu: float | None       # share of the CPUs other processes took while it ran
    load_before: float | None      # 1-minute load average before it started
    cpus: int
    threads: int

    def warnings(self) -> list[str]:
        """What says the machine was not quiet: one line each, [] when nothing did."""
        out = []
        if is_busy(self.others_cpu, self.cpus, self.threads):
            out.append(f"other processes took {self.others_cpu:.0%} of {self.cpus} CPUs while calibrating")
        if self.load_before is not None and self.load_before > self.cpus - self.threads + 0.5:
            out.append(f"load average {self.load_before:.2f} on {self.cpus} CPUs before calibrating")
        for p in self.peaks.values():
            if p.spread > WIDE_SPREAD or not p.settled:
                out.append(f"{p.key}: {p.describe()}")
        return out


def _peak(key: str, work: float, fn: Callable[[], object], budget_s: float) -> Peak:
    timing, settled = best_of(fn, min_calls=10, patience=10, budget_s=budget_s)
    return Peak(key, work, timing, settled)


def matmul_peak(size: int, dtype: torch.dtype, budget_s: float = 5.0) -> Peak:
    """A size x size x size matmul (2*n^3 FLOPs, OPs for int8) at its fastest."""
    key = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int8: "int8"}[dtype]
    if dtype == torch.int8:
        a = torch.randint(-127, 127, (size, size), dtype=torch.int8)
        b = torch.randint(-127, 127, (size, size), dtype=torch.int8)
        fn = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        fn = lambda: torch.mm(a, b)  # noqa: E731
    return _peak(key, 2 * size**3, fn, budget_s)


def copy_peak(mib: int, budget_s: float = 5.0) -> Peak:
    """Bytes/s of a large tensor copy at its fastest, counting both the read and the write."""
    n = mib * (1 << 20) // 4
    src, dst = torch.rand(n), torch.empty(n)
    return _peak("memory_bandwidth", 2 * n * 4, lambda: dst.copy_(src), budget_s)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def calibrate(name: str = "local", size: int = 2048, copy_mib: int = 512, budget_s: float = 5.0,
              progress: Callable[[str], None] = lambda s: None) -> Calibration:
    """Measure fp32 and bf16 matmul peaks (int8 where torch._int_mm runs) and copy bandwidth,
    each for at most `budget_s` seconds, watching how busy the machine was meanwhile."""
    threads, cpus = torch.get_num_threads(), os.cpu_count() or 1
    load_before, counters, t0 = _load_average(), cpu_counters(), time.perf_counter()
    peaks: dict[str, Peak] = {}
    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        progress(f"matmul {dtype} {size}^3")
        try:
            p = matmul_peak(size, dtype, budget_s)
        except RuntimeError:  # e.g. no int8 matmul kernel on this CPU build
            continue
        peaks[p.key] = p
    progress(f"copy {copy_mib} MiB")
    peaks["memory_bandwidth"] = copy_peak(copy_mib, budget_s)
    others = others_share(counters, cpu_counters(), time.perf_counter() - t0, cpus)
    return Calibration(_profile(name, size, copy_mib, peaks, threads), peaks, others, load_before, cpus, threads)


def _profile(name: str, size: int, copy_mib: int, peaks: dict[str, Peak], threads: int) -> HardwareProfile:
    when = datetime.date.today().isoformat()
    how = f"measured by `kiln hardware calibrate` on {when}, {threads} threads"
    sources = {k: f"torch matmul {size}x{size}x{size} {k}, {p.describe()} ({peak_unit(k)}), {how}"
               for k, p in peaks.items() if k != "memory_bandwidth"}
    sources["memory_bandwidth"] = (f"copy of {copy_mib} MiB (read + write counted), "
                                   f"{peaks['memory_bandwidth'].describe()}, {how}")
    return HardwareProfile(
        name=name, description=f"{_cpu_name()} ({threads} threads, measured)", kind="cpu",
        peak_flops={k: p.value for k, p in peaks.items() if k != "memory_bandwidth"},
        memory_bandwidth=peaks["memory_bandwidth"].value, fallback="fp32", sources=sources,
    )

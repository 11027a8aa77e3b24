"""Measure this machine's peak matmul FLOP/s and memory bandwidth into a HardwareProfile."""
from __future__ import annotations

import datetime
import platform
import statistics
import time
from typing import Callable

import torch

from kiln.hardware.profiles import HardwareProfile


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-touch page faults and kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops(size: int, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of a size x size x size matmul (2*n^3 FLOPs), median of `repeats`."""
    if dtype == torch.int8:
        a = torch.randint(-127, 127, (size, size), dtype=torch.int8)
        b = torch.randint(-127, 127, (size, size), dtype=torch.int8)
        fn = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        fn = lambda: torch.mm(a, b)  # noqa: E731
    return 2 * size**3 / _median_seconds(fn, repeats)


def copy_bandwidth(mib: int, repeats: int) -> float:
    """Bytes/s of a large tensor copy, counting both the read and the write."""
    n = mib * (1 << 20) // 4
    src, dst = torch.rand(n), torch.empty(n)
    return 2 * n * 4 / _median_seconds(lambda: dst.copy_(src), repeats)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibrate(name: str = "local", size: int = 2048, copy_mib: int = 512, repeats: int = 5,
              progress: Callable[[str], None] = lambda s: None) -> HardwareProfile:
    """Measure fp32 and bf16 matmul peaks (int8 where torch._int_mm runs) and copy bandwidth."""
    threads = torch.get_num_threads()
    when = datetime.date.today().isoformat()
    how = f"measured by `kiln hardware calibrate` on {when}, {threads} threads, median of {repeats}"
    peaks, sources = {}, {}
    for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
        progress(f"matmul {key} {size}^3")
        try:
            peaks[key] = matmul_flops(size, dtype, repeats)
        except RuntimeError:  # e.g. no int8 matmul kernel on this CPU build
            continue
        sources[key] = f"torch matmul {size}x{size}x{size} {key}, {how}"
    progress(f"copy {copy_mib} MiB")
    bandwidth = copy_bandwidth(copy_mib, repeats)
    sources["memory_bandwidth"] = f"copy of {copy_mib} MiB (read + write counted), {how}"
    return HardwareProfile(
        name=name, description=f"{_cpu_name()} ({threads} threads, measured)", kind="cpu",
        peak_flops=peaks, memory_bandwidth=bandwidth, fallback="fp32", sources=sources,
    )

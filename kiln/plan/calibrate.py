"""`kiln cluster calibrate`: measure this machine's gloo collectives under torchrun and fit each
to t = latency + bus_factor(n) * S / bus_bandwidth per process count (kiln.plan.collectives).

Every rank runs the same calls in the same order through kiln.timing.measure, configured so
that no rank decides on its own to call again (no re-measure, no run-off, no extra untimed
call for short calls): a collective whose ranks disagree on the call count would hang. The
figure of a size is the slowest rank's median (a collective ends when its last rank does).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kiln.errors import KilnError
from kiln.plan.cluster import CalibratedConfig, ClusterConfig, LinkConfig, Precision
from kiln.plan.collectives import Collective, fit_latency_bandwidth
from kiln.timing import TimingConfig, measure
from kiln.train.distributed import torchrun_command

# bytes per message for the fit: apart from the figure's evaluation sizes (4 KB ... 64 MB)
FIT_SIZES = (1 << 10, 16 << 10, 256 << 10, 4 << 20, 32 << 20)
EVAL_SIZES = (4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20)
PROCESSES = (2, 4)
SPLIT_BYTES = 256 << 10      # small and large messages are fitted apart (both sides hold 3 FIT_SIZES)
MEASURED = (Collective.ALL_REDUCE, Collective.ALL_GATHER, Collective.REDUCE_SCATTER,
            Collective.BROADCAST, Collective.P2P)


def rounds_for(size: int) -> int:
    """Fewer rounds for large messages (a 64 MB gloo reduce-scatter at 4 ranks takes ~1 s here)."""
    return 3 if size >= 16 << 20 else 6 if size >= 1 << 20 else 12


def _calls(size: int, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist

    elems = max(size // 4, world)          # float32 elements, divisible by the world size
    elems -= elems % world
    full, part = torch.ones(elems), torch.ones(elems // world)
    peer = rank ^ 1                         # pairs (0, 1), (2, 3): every rank sends or receives

    def p2p():
        if peer >= world:
            return
        (dist.isend if rank % 2 == 0 else dist.irecv)(full, peer).wait()

    return {
        Collective.ALL_REDUCE.value: lambda: dist.all_reduce(full),
        Collective.ALL_GATHER.value: lambda: dist.all_gather_into_tensor(full, part),
        Collective.REDUCE_SCATTER.value: lambda: dist.reduce_scatter_tensor(part, full),
        Collective.BROADCAST.value: lambda: dist.broadcast(full, 0),
        Collective.P2P.value: p2p,
    }


def rank_main(sizes: list[int], out: str) -> None:
    """One rank: time every collective at every size; rank 0 writes {collective: {size: s}}."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        result: dict[str, dict[str, float]] = {c.value: {} for c in MEASURED}
        for size in sizes:
            calls = _calls(size, rank, world)
            cfg = TimingConfig(rounds=rounds_for(size), warmup=1, short_call_s=0.0, remeasure=False,
                               runoff_margin=0.0, rotate=False)
            m = measure(calls, cfg)
            medians = torch.tensor([m[name].median for name in calls], dtype=torch.float64)
            dist.all_reduce(medians, op=dist.ReduceOp.MAX)
            for name, value in zip(calls, medians.tolist()):
                result[name][str(size)] = value
        if rank == 0:
            Path(out).write_text(json.dumps({"processes": world, "times_s": result}))
    finally:
        dist.destroy_process_group()


def measure_collectives(processes: int, sizes: tuple[int, ...]) -> dict[str, dict[int, float]]:
    """{collective: {bytes: seconds}} measured with `processes` gloo ranks under torchrun."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        cmd = torchrun_command(processes) + ["-m", "kiln.plan.calibrate", "--out", str(out),
                                             "--sizes", ",".join(map(str, sizes))]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode or not out.is_file():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise KilnError(f"collective calibration with {processes} processes failed: {tail}")
        times = json.loads(out.read_text())["times_s"]
    return {name: {int(s): t for s, t in per.items()} for name, per in times.items()}


def fit_all(measured: dict[int, dict[str, dict[int, float]]], split: int = SPLIT_BYTES) -> dict[str, CalibratedConfig]:
    """Per collective and process count, two (latency, bus bandwidth) fits: messages up to
    `split` bytes and from it on (the split size belongs to both), as gloo changes algorithm
    with the size; one fit over all sizes when either side has fewer than two sizes."""
    out = {}
    for op in MEASURED:
        large, small = [], []
        for n, per in sorted(measured.items()):
            times = per[op.value]
            sizes = sorted(times)
            lo, hi = [s for s in sizes if s <= split], [s for s in sizes if s >= split]
            if len(lo) < 2 or len(hi) < 2:
                lo = hi = sizes
            fit = lambda chosen: fit_latency_bandwidth(op, n, [float(s) for s in chosen], [times[s] for s in chosen])
            large.append(fit(hi))
            small.append(fit(lo))
        out[op.value] = CalibratedConfig(
            tuple(f.processes for f in large), tuple(f.latency_s for f in large), tuple(f.bus_bandwidth for f in large),
            float(split), tuple(f.latency_s for f in small), tuple(f.bus_bandwidth for f in small))
    return out


def local_profile(collectives: dict[str, CalibratedConfig], processes: tuple[int, ...],
                  device: str = "local") -> ClusterConfig:
    """This machine as a cluster: its processes share the node's compute and memory."""
    day = datetime.date.today().isoformat()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    how = f"measured by kiln cluster calibrate on {day} (gloo, {', '.join(map(str, processes))} processes, " \
          f"sizes {FIT_SIZES[0]} B to {FIT_SIZES[-1] >> 20} MiB)"
    p2p = collectives[Collective.P2P.value]
    sources = {
        "device": "kiln hardware profile 'local' (kiln hardware calibrate): the whole machine's peaks",
        "device_memory": f"this machine's physical memory (sysconf) read on {day}, shared by its processes",
        "devices_per_node": f"the largest process count calibrated ({max(processes)})",
        "max_nodes": "one machine", "precision": "CPU training computes in fp32 (no bf16 peak beyond fp32 here)",
        "intra.latency_s": f"{how}: point-to-point latency", "intra.bandwidth": f"{how}: point-to-point bandwidth",
    } | {f"collectives.{k}": how for k in collectives}
    return ClusterConfig(
        name="local", description=f"this machine: gloo over loopback, up to {max(processes)} processes",
        device=device, device_memory=float(memory), devices_per_node=max(processes), max_nodes=1,
        precision=Precision.FP32, intra=LinkConfig(p2p.latency_s[0], p2p.bus_bandwidth[0]),
        share_node=True, collectives=collectives, sources=sources)


def calibrate(processes: tuple[int, ...] = PROCESSES, sizes: tuple[int, ...] = FIT_SIZES,
              progress=lambda message: None) -> tuple[ClusterConfig, dict]:
    """Measure, fit and return the local profile and the raw times {n: {collective: {bytes: s}}}."""
    measured = {}
    for n in processes:
        progress(f"{n} processes")
        measured[n] = measure_collectives(n, sizes)
    return local_profile(fit_all(measured), processes), measured


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", required=True)
    args = parser.parse_args()
    rank_main([int(s) for s in args.sizes.split(",")], args.out)
    sys.exit(0)

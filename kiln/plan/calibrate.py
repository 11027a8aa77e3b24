"""`kiln cluster calibrate`: measure this machine's gloo collectives under torchrun and fit each
to t = steps(op, n) * latency + bus_factor(op, n) * S / bus_bandwidth per process count
(kiln.plan.collectives), small and large messages apart; and how much slower a process
computes while N processes compute at once than alone (the contention of ranks that share
this machine's cores, ClusterConfig.contention), from N concurrent copies of one probe.

How a collective is timed (the earlier routine's quiet figure at 4 KB, 3.4 ms where 64 KB took
0.5 ms, reproduced neither with that routine nor with a plain loop here, 0.12-0.35 ms; what
follows removes what a figure should not depend on):
- point-to-point as a ping-pong, half the round trip per message;
- one collective at a time, never interleaved with the others: broadcast and point-to-point
  return on the sender before the receiver is done, so whatever ran next on the sender waited
  for the receiver and was charged the skew;
- a barrier before each collective's samples and two untimed calls (gloo's first call at a
  size allocates and connects its buffers);
- each sample is `repeats_for(size)` back-to-back calls (16 up to 64 KB): a sample spans a
  few milliseconds, so one late thread wake-up (an idle vCPU halts; waking it goes through
  the hypervisor) is shared by the calls instead of being the sample;
- the figure of a size is the slowest rank's median (a collective ends when its last rank
  does); the slowest rank's fastest sample is kept beside it.
Every rank runs the same calls in the same order through kiln.timing.measure, configured so
that no rank decides on its own to call again (no re-measure, no run-off, no extra untimed
call for short calls): a collective whose ranks disagree on the call count would hang.
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
from kiln.plan.cluster import CalibratedConfig, ClusterConfig, ContentionConfig, LinkConfig, Precision
from kiln.plan.collectives import Collective, fit_latency_bandwidth
from kiln.timing import TimingConfig, measure
from kiln.train.distributed import torchrun_command

# bytes per message for the fit: apart from the figure's evaluation sizes (4 KB ... 64 MB), and
# bracketing them (128 MiB: the 64 MB figure is read between fitted sizes, not beyond them)
FIT_SIZES = (1 << 10, 16 << 10, 256 << 10, 2 << 20, 8 << 20, 32 << 20, 128 << 20)
EVAL_SIZES = (4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20)
PROCESSES = (2, 4)
# small and large messages are fitted apart at a core's L2 cache (2 MiB per core on this
# machine's Xeon, lscpu): up to it a message is copied cache to cache, beyond it through L3 and
# memory at another rate. Each side holds 4 FIT_SIZES (the split size belongs to both).
SPLIT_BYTES = 2 << 20
MEASURED = (Collective.ALL_REDUCE, Collective.ALL_GATHER, Collective.REDUCE_SCATTER,
            Collective.BROADCAST, Collective.P2P)


def rounds_for(size: int) -> int:
    """Fewer samples for large messages (a 128 MB gloo reduce-scatter at 4 ranks takes ~0.4 s)."""
    return 5 if size >= 16 << 20 else 8 if size >= 1 << 20 else 15


def repeats_for(size: int) -> int:
    """Back-to-back calls per sample: 16 up to 64 KB, fewer up to 1 MB, then 1 (the same on every
    rank: it depends on the size alone)."""
    return max(1, min(16, (1 << 20) // size))


def _calls(size: int, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist

    elems = max(size // 4, world)          # float32 elements, divisible by the world size
    elems -= elems % world
    full, part = torch.ones(elems), torch.ones(elems // world)
    peer = rank ^ 1                         # pairs (0, 1), (2, 3): every rank sends or receives

    def p2p():
        # ping-pong (OSU's osu_latency): the even rank sends and waits for the reply, so a call is
        # two one-way messages end to end; one-way sends back to back would time the sender's
        # queue, not a message's flight (a pipeline stage waits for each one)
        if peer >= world:
            return
        first, second = (dist.isend, dist.irecv) if rank % 2 == 0 else (dist.irecv, dist.isend)
        first(full, peer).wait()
        second(full, peer).wait()

    return {
        Collective.ALL_REDUCE.value: lambda: dist.all_reduce(full),
        Collective.ALL_GATHER.value: lambda: dist.all_gather_into_tensor(full, part),
        Collective.REDUCE_SCATTER.value: lambda: dist.reduce_scatter_tensor(part, full),
        Collective.BROADCAST.value: lambda: dist.broadcast(full, 0),
        Collective.P2P.value: p2p,
    }


def rank_main(sizes: list[int], out: str) -> None:
    """One rank: time every collective at every size; rank 0 writes {collective: {size: s}}
    (the slowest rank's median per call) and the same of the fastest samples."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        result: dict[str, dict[str, float]] = {c.value: {} for c in MEASURED}
        fastest: dict[str, dict[str, float]] = {c.value: {} for c in MEASURED}
        for size in sizes:
            k = repeats_for(size)
            cfg = TimingConfig(rounds=rounds_for(size), warmup=2, short_call_s=0.0, remeasure=False,
                               runoff_margin=0.0, rotate=False)
            for name, fn in _calls(size, rank, world).items():
                def block(fn=fn):
                    for _ in range(k):
                        fn()
                dist.barrier()
                # a point-to-point call is a round trip: two messages
                t = measure({name: block}, cfg)[name].per(k * (2 if name == Collective.P2P.value else 1))
                figures = torch.tensor([t.median, t.min], dtype=torch.float64)
                dist.all_reduce(figures, op=dist.ReduceOp.MAX)
                result[name][str(size)], fastest[name][str(size)] = figures.tolist()
        if rank == 0:
            Path(out).write_text(json.dumps({"processes": world, "times_s": result, "fastest_s": fastest}))
    finally:
        dist.destroy_process_group()


# the contention probe: a two-layer MLP's training step (matmuls, an activation, SGD), at a size
# that takes tens of milliseconds on one core, like a rank's step of the zoo models
PROBE = (256, 1024, 256)     # batch, hidden width, model width


def _probe():
    import torch

    torch.manual_seed(0)
    batch, hidden, width = PROBE
    model = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, width))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, width)

    def step():
        with torch.enable_grad():   # kiln.timing.measure times under no_grad
            opt.zero_grad(set_to_none=True)
            model(x).pow(2).mean().backward()
            opt.step()
    return step


def contention_main(rounds: int, out: str) -> None:
    """One of N ranks computing at once: time the probe (1 thread, no communication while
    timed) after a barrier; rank 0 writes the slowest rank's median."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        step = _probe()
        dist.barrier()
        cfg = TimingConfig(rounds=rounds, warmup=3, short_call_s=0.0, remeasure=False, runoff_margin=0.0, rotate=False)
        median = torch.tensor([measure({"probe": step}, cfg)["probe"].median], dtype=torch.float64)
        dist.all_reduce(median, op=dist.ReduceOp.MAX)
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps({"processes": dist.get_world_size(), "median_s": median.item()}))
    finally:
        dist.destroy_process_group()


def _run_probe(processes: int, rounds: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.json"
        cmd = torchrun_command(processes) + ["-m", "kiln.plan.calibrate", "--contention", "--out", str(out),
                                             "--rounds", str(rounds)]
        done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if done.returncode or not out.is_file():
            lines = done.stderr.strip().splitlines() or ["no output"]
            tail = next((line for line in reversed(lines) if "Error" in line), lines[-1])
            raise KilnError(f"contention probe with {processes} processes failed: {tail}")
        return json.loads(out.read_text())["median_s"]


def measure_contention(processes: tuple[int, ...] = PROCESSES, rounds: int = 30) -> tuple[ContentionConfig, dict]:
    """How much slower one process computes while N compute at once (N concurrent copies of
    one single-threaded probe under torchrun, no communication while timed) than alone: the
    slowest copy's median over the lone copy's. (The cluster's slowdown; the raw medians.)"""
    alone = _run_probe(1, rounds)
    together = {n: _run_probe(n, rounds) for n in processes}
    slow = tuple(max(1.0, together[n] / alone) for n in processes)
    return ContentionConfig(tuple(processes), slow), {"alone_s": alone, "together_s": together}


def measure_collectives(processes: int, sizes: tuple[int, ...], fastest: dict | None = None) -> dict[str, dict[int, float]]:
    """{collective: {bytes: seconds}} measured with `processes` gloo ranks under torchrun (the
    slowest rank's median); `fastest`, when given, receives the slowest rank's fastest samples."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        cmd = torchrun_command(processes) + ["-m", "kiln.plan.calibrate", "--out", str(out),
                                             "--sizes", ",".join(map(str, sizes))]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode or not out.is_file():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise KilnError(f"collective calibration with {processes} processes failed: {tail}")
        data = json.loads(out.read_text())
    if fastest is not None:
        fastest.update({name: {int(s): t for s, t in per.items()} for name, per in data["fastest_s"].items()})
    return {name: {int(s): t for s, t in per.items()} for name, per in data["times_s"].items()}


def fit_all(measured: dict[int, dict[str, dict[int, float]]], split: int = SPLIT_BYTES) -> dict[str, CalibratedConfig]:
    """Per collective and process count, two (per-step latency, bus bandwidth) fits: messages up
    to `split` bytes and from it on (the split size belongs to both); one fit over all sizes
    when either side has fewer than two sizes."""
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
        out[op.value] = CalibratedConfig.of(op, large, small, split)
    return out


def local_profile(collectives: dict[str, CalibratedConfig], processes: tuple[int, ...],
                  device: str = "local", contention: ContentionConfig | None = None) -> ClusterConfig:
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
    if contention is not None:
        sources["contention"] = (f"measured by kiln cluster calibrate on {day}: {', '.join(map(str, contention.processes))} "
                                 f"concurrent single-threaded copies of one MLP training step against one alone (medians)")
    return ClusterConfig(
        name="local", description=f"this machine: gloo over loopback, up to {max(processes)} processes",
        device=device, device_memory=float(memory), devices_per_node=max(processes), max_nodes=1,
        precision=Precision.FP32, intra=LinkConfig(p2p.latency_s[0], p2p.bus_bandwidth[0]),
        share_node=True, collectives=collectives, contention=contention, sources=sources)


def calibrate(processes: tuple[int, ...] = PROCESSES, sizes: tuple[int, ...] = FIT_SIZES,
              progress=lambda message: None) -> tuple[ClusterConfig, dict]:
    """Measure, fit and return the local profile and the raw times {n: {collective: {bytes: s}}}."""
    measured = {}
    for n in processes:
        progress(f"{n} processes")
        measured[n] = measure_collectives(n, sizes)
    progress("contention: " + ", ".join(map(str, processes)) + " processes computing at once")
    contention, probe = measure_contention(processes)
    profile = local_profile(fit_all(measured), processes, contention=contention)
    return profile, measured | {"contention": probe}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes")
    parser.add_argument("--contention", action="store_true")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if args.contention:
        contention_main(args.rounds, args.out)
    else:
        rank_main([int(s) for s in args.sizes.split(",")], args.out)
    sys.exit(0)

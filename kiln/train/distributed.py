"""Parallel training: `kiln train ... --nproc N [--parallel MODE --mesh AxB]` launches torchrun;
each rank runs `fit` with the engine of its mode (kiln.train.parallel: ddp, zero1, fsdp, hsdp,
tp, pp and the 2-D pairs), gloo on CPU."""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from torch.utils.data import DataLoader

from kiln.config import load_toml, to_dict, to_toml
from kiln.errors import KilnError
from kiln.train.config import TrainConfig
from kiln.train.parallel.config import Mode, ParallelConfig, allocator_env
from kiln.train.parallel.pp import check_pipeline
from kiln.train.parallel.registry import make_engine
from kiln.train.parallel.tp import check_tensor_parallel
from kiln.train.trainer import build, fit


def check(cfg: TrainConfig, parallel: ParallelConfig, world: int) -> ParallelConfig:
    """Everything that can be known before a process starts: counts, the mesh, and the model
    against the plan (TP degree against heads and widths, pipeline splits against modules).
    Returns the plan with its pipeline split resolved (balanced by FLOPs when not given)."""
    if not cfg.out:
        raise KilnError("parallel training needs --out: the ranks report through the run directory")
    data = parallel.data_parallel(world)
    if cfg.batch_size % data:
        raise KilnError(f"batch_size {cfg.batch_size} must be divisible by the {data} data-parallel processes")
    setup = build(cfg)   # the model and dataset load and fit each other
    if Mode.TP in parallel.modes:
        check_tensor_parallel(setup.model, parallel.degree(Mode.TP, world))
    if Mode.PP in parallel.modes:
        if cfg.teacher or hasattr(setup.model, "loss"):
            raise KilnError("pipeline parallel trains models scored by the task's loss; not a teacher or a model's own loss")
        example = next(iter(DataLoader(setup.splits.train, batch_size=2)))[0]
        split = check_pipeline(setup.model, parallel, parallel.degree(Mode.PP, world), cfg.batch_size // data,
                               example, cfg.model)
        parallel = replace(parallel, split=split)
    return parallel


def check_endpoint(endpoint: str, node_rank: int, wait_s: float = 300.0) -> None:
    """The rendezvous host must resolve; node 0 must be that host (it serves the rendezvous), the
    others must reach it within `wait_s` (the first node may start a little later)."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise KilnError(f"--rdzv-endpoint {endpoint!r}: needs host:port, e.g. 10.0.0.1:29400")
    try:
        addresses = {a[4][0] for a in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):
        raise KilnError(f"--rdzv-endpoint {endpoint}: host {host!r} does not resolve; "
                        f"give an address or name this machine can resolve") from None
    if node_rank == 0:
        for address in addresses:
            try:
                with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
                    s.bind((address, 0))
                return
            except OSError:
                continue
        raise KilnError(f"--rdzv-endpoint {endpoint}: node 0 serves the rendezvous, but {host} is not an address "
                        f"of this machine; run node 0 on {host} or give one of this machine's addresses")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise KilnError(f"--rdzv-endpoint {endpoint}: nothing answers there after {wait_s:.0f} s; "
                                f"start node 0 (--node-rank 0) first, on that host and port") from None
            time.sleep(0.5)


def launch(cfg: TrainConfig, nproc: int, resume: bool = False, nnodes: int = 1, node_rank: int = 0,
           rdzv_endpoint: str = "", parallel: ParallelConfig = ParallelConfig()) -> int:
    """Run torchrun with `nproc` processes per node; returns its exit code (0), or raises a
    one-line KilnError naming the rank that failed.

    What can be checked here is checked before any process starts, so bad input is one line."""
    if nproc < 1:
        raise KilnError(f"--nproc must be >= 1, got {nproc}")
    world = nproc * nnodes
    out = Path(cfg.out) if cfg.out else None
    if out and not resume and out.is_dir() and any(out.iterdir()):
        raise KilnError(f"run directory {out} already exists and is not empty: pass --resume or another --out")
    parallel = check(cfg, parallel, world)
    if nnodes > 1 or rdzv_endpoint:
        check_endpoint(rdzv_endpoint or "localhost:29400", node_rank)
    with tempfile.TemporaryDirectory() as tmp:
        config, plan = Path(tmp) / "train.toml", Path(tmp) / "parallel.toml"
        config.write_text(to_toml(cfg))
        plan.write_text(to_toml(parallel))
        cmd = torchrun_command(nproc, nnodes, node_rank, rdzv_endpoint)
        cmd += ["-m", "kiln.train.distributed", "--config", str(config), "--parallel", str(plan)]
        cmd += ["--resume"] if resume else []
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(cfg.threads or 1))}
        return _run(cmd, env | allocator_env(parallel, env), out)


def torchrun_command(nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str = "") -> list[str]:
    """torchrun's command line up to the program it runs: standalone on one node, else the
    c10d rendezvous at `rdzv_endpoint` (host:port). The one launcher of kiln's process groups."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]
    if nnodes > 1 or rdzv_endpoint:
        return cmd + [f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint or 'localhost:29400'}"]
    return cmd + ["--standalone"]


def _run(cmd: list[str], env: dict, out: Path | None) -> int:
    """torchrun, its output passed through; a failure becomes one line naming the first rank
    that failed (torchrun's "Root Cause" summary) and its exit code."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
    failed, in_summary = None, False
    for line in proc.stderr:
        in_summary = in_summary or "Root Cause" in line
        found = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", line) or \
            (re.search(r"rank\s*:\s*(\d+) \(local_rank", line) if in_summary else None)
        if in_summary and found and failed is None:
            failed = found.group(1)
        sys.stderr.write(line)
    code = proc.wait()
    if code:
        keeps = f"; {out} keeps the last completed epoch" if out and (out / "state.pt").is_file() else \
            "; nothing was saved (no epoch completed)"
        raise KilnError(f"rank {failed if failed is not None else '?'} failed (torchrun exit code {code}) and torchrun "
                        f"stopped the job (its message is above){keeps}")
    return code


def rank_main(config: str, plan: str, resume: bool) -> None:
    import torch.distributed as dist

    cfg = load_toml(TrainConfig, config)
    parallel = load_toml(ParallelConfig, plan)
    # the trainer keeps model and data on the CPU, so gloo even where CUDA exists
    dist.init_process_group("gloo")
    try:
        engine = make_engine(parallel)
        engine.describe = {**to_dict(parallel), "world": dist.get_world_size()}
        fit(cfg, resume=resume, progress=engine.where.rank == 0, engine=engine)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--parallel", required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    try:
        rank_main(args.config, args.parallel, args.resume)
    except KilnError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        sys.exit(2)

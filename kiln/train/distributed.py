"""Data parallel training: `kiln train ... --nproc N` launches torchrun, each rank runs `fit`
with its slice of every global batch and DDP averaging gradients (gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kiln.config import load_toml, to_toml
from kiln.errors import KilnError
from kiln.train.config import TrainConfig
from kiln.train.trainer import Dist, build, fit


def launch(cfg: TrainConfig, nproc: int, resume: bool = False, nnodes: int = 1, node_rank: int = 0,
           rdzv_endpoint: str = "") -> int:
    """Run torchrun with `nproc` processes per node; returns its exit code.

    What can be checked here is checked before any process starts, so bad input is one line."""
    if nproc < 1:
        raise KilnError(f"--nproc must be >= 1, got {nproc}")
    world = nproc * nnodes
    if cfg.batch_size % world:
        raise KilnError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    if not cfg.out:
        raise KilnError("data-parallel training needs --out: the ranks report through the run directory")
    out = Path(cfg.out)
    if not resume and out.is_dir() and any(out.iterdir()):
        raise KilnError(f"run directory {out} already exists and is not empty: pass --resume or another --out")

    build(cfg)   # the model and dataset load and fit each other
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "train.toml"
        config.write_text(to_toml(cfg))
        cmd = torchrun_command(nproc, nnodes, node_rank, rdzv_endpoint)
        cmd += ["-m", "kiln.train.distributed", "--config", str(config)] + (["--resume"] if resume else [])
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(cfg.threads or 1))}
        return subprocess.run(cmd, env=env).returncode


def torchrun_command(nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str = "") -> list[str]:
    """torchrun's command line up to the program it runs: standalone on one node, else the
    c10d rendezvous at `rdzv_endpoint` (host:port). The one launcher of kiln's process groups."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]
    if nnodes > 1 or rdzv_endpoint:
        return cmd + [f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint or 'localhost:29400'}"]
    return cmd + ["--standalone"]


def rank_main(config: str, resume: bool) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP


    cfg = load_toml(TrainConfig, config)
    # the trainer keeps model and data on the CPU, so gloo even where CUDA exists
    dist.init_process_group("gloo")
    try:
        here = Dist(dist.get_rank(), dist.get_world_size())
        fit(cfg, resume=resume, dist=here, progress=here.main, wrap=lambda m: DDP(m))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    try:
        rank_main(args.config, args.resume)
    except KilnError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        sys.exit(2)

"""The chosen plan as the `kiln train` command that runs it, and as a launch script: torchrun's
c10d rendezvous (one launcher per node) or a SLURM batch script (srun starts one per node).

`kiln train` runs torchrun itself (kiln.train.distributed.launch): on several nodes each node
runs the same command with its --node-rank and the rendezvous endpoint of node 0.
"""
from __future__ import annotations

import enum
import math
import shlex

from kiln.plan.plans import Plan


class Emit(enum.Enum):
    TORCHRUN = "torchrun"
    SLURM = "slurm"


RDZV_PORT = 29400


def nodes_for(plan: Plan, devices_per_node: int) -> tuple[int, int]:
    """(nodes, processes per node) that hold the plan's devices."""
    per_node = min(plan.devices, devices_per_node)
    return math.ceil(plan.devices / per_node), per_node


def train_args(spec: str, plan: Plan, global_batch: int, devices_per_node: int, out: str = "runs/plan") -> list[str]:
    """`kiln train` arguments for the plan (flag names as the parallel modes define them)."""
    nodes, per_node = nodes_for(plan, devices_per_node)
    args = ["kiln", "train", spec, "--out", out, "--parallel", plan.mode, "--nproc", str(per_node),
            "--batch-size", str(global_batch)]
    two = [d for d in (plan.dp, plan.tp, plan.pp) if d > 1]
    if len(two) == 2:
        args += ["--mesh", "x".join(map(str, two))]
    if plan.dp > 1 and plan.zero == 2:
        args += ["--no-reshard-after-forward"]      # FSDP2 keeping the gathered weights: ZeRO-2's sharding
    if plan.pp > 1:
        args += ["--stages", str(plan.pp), "--microbatches", str(plan.microbatches), "--schedule", plan.schedule.value]
    elif plan.microbatches > 1:
        args += ["--grad-accumulation", str(plan.microbatches)]
    if plan.recompute:
        args += ["--checkpoint-activations"]
    if nodes > 1:
        args += ["--nnodes", str(nodes)]
    return args


def command_line(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def script(kind: Emit, args: list[str], plan: Plan, devices_per_node: int, header: str,
           hours: float | None = None, gpus: bool = True) -> str:
    """The launch script's text (`gpus`: the devices are GPUs, which SLURM allocates per node)."""
    nodes, per_node = nodes_for(plan, devices_per_node)
    line = command_line(args)
    if kind is Emit.TORCHRUN:
        return "\n".join([
            "#!/usr/bin/env bash", f"# {header}",
            f"# torchrun c10d rendezvous, {nodes} node(s) x {per_node} process(es): run this on every node with",
            "#   NODE_RANK=<0..nodes-1> MASTER_ADDR=<node 0's address> ./this-script",
            "set -euo pipefail",
            ': "${NODE_RANK:=0}"', ': "${MASTER_ADDR:=127.0.0.1}"', f': "${{MASTER_PORT:={RDZV_PORT}}}"',
            f'exec {line} --node-rank "$NODE_RANK" --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"', ""])
    limit = _slurm_time(hours * 1.2 + 0.25) if hours is not None else "24:00:00"   # 20% and 15 min of margin
    allocate = [f"#SBATCH --gpus-per-node={per_node}"] if gpus else [f"#SBATCH --cpus-per-task={per_node}"]
    return "\n".join([
        "#!/bin/bash", f"# {header}",
        "#SBATCH --job-name=kiln-plan", f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1", *allocate,
        f"#SBATCH --time={limit}", "#SBATCH --output=kiln-plan-%j.out", "set -euo pipefail",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_ADDR",
        "# one launcher per node; torchrun (inside kiln train) meets the others at node 0's c10d rendezvous",
        f"srun --kill-on-bad-exit=1 bash -c '{line.replace(chr(39), chr(39) + chr(92) + chr(39) + chr(39))}"
        f" --node-rank \"$SLURM_NODEID\" --rdzv-endpoint \"$MASTER_ADDR:{RDZV_PORT}\"'", ""])


def _slurm_time(hours: float) -> str:
    minutes = max(1, math.ceil(hours * 60))
    days, rest = divmod(minutes, 24 * 60)
    text = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{text}" if days else text

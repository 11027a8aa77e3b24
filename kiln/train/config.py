"""The training config: one frozen dataclass; `kiln train --config t.toml` maps onto it."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from kiln.config import from_dict
from kiln.errors import KilnError
from kiln.train.optimizers import OPTIMIZERS


class Schedule(enum.StrEnum):
    """The learning rate's shape over the run (after any warm-up)."""
    COSINE = "cosine"
    CONSTANT = "constant"
    LINEAR = "linear"
    ONECYCLE = "onecycle"


@dataclass(frozen=True)
class TrainConfig:
    model: str
    dataset: str = ""            # empty: the zoo model's default dataset
    out: str = ""                # run directory
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    optimizer: str = "adamw"      # a name in kiln.train.optimizers.OPTIMIZERS
    weight_decay: float = 0.01
    momentum: float = 0.9        # sgd only
    schedule: Schedule = Schedule.COSINE
    warmup_fraction: float = 0.0
    grad_clip: float = 0.0       # max global grad norm; 0 = off
    bf16: bool = False           # autocast matmuls/convs to bfloat16
    label_smoothing: float = 0.0
    max_steps: int = 0           # stop after this many optimizer steps (0 = no limit)
    eval_batch_size: int = 256
    threads: int = 0             # torch threads per process (0 = torch's default)
    init: str = ""               # start from this kiln run's model (any command's; a quantized one: QAT) or a .safetensors
    quant: str = ""              # quantization-aware training with this quant config (TOML)
    calib_batches: int = 8       # QAT: batches that set the activation scales before training
    teacher: str = ""            # distil from this model (spec, run or artifact directory)
    distill_alpha: float = 0.5   # weight of the distillation term (with a teacher)
    distill_temperature: float = 2.0
    lora: str = ""               # LoRA adapters: `r=8,alpha=16,...` (kiln.lowrank.lora.parse)
    qlora: bool = False          # LoRA on NF4 base weights


    def __post_init__(self):
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS.names())}"),
            (self.schedule in set(Schedule), f"schedule must be one of {', '.join(Schedule)}"),
            (0 <= self.warmup_fraction < 1, "warmup_fraction must be in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip must be >= 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.max_steps >= 0, "max_steps must be >= 0"),
            (self.calib_batches >= 1, "calib_batches must be >= 1"),
            (0 <= self.distill_alpha <= 1, "distill_alpha must be in [0, 1]"),
            (self.distill_temperature > 0, "distill_temperature must be > 0"),
            (not ((self.lora or self.qlora) and self.quant), "lora/qlora and quant do not combine: --qlora is the quantized LoRA"),
        ]
        for ok, message in checks:
            if not ok:
                raise KilnError(f"train config: {message}")


# what fine-tuning may set; the model, data, init, teacher and run directory come from the run
FINETUNE_KEYS = ("epochs", "lr", "batch_size", "seed", "optimizer", "weight_decay", "momentum", "schedule",
                 "warmup_fraction", "grad_clip", "bf16", "label_smoothing", "max_steps", "eval_batch_size",
                 "threads", "distill", "distill_alpha", "distill_temperature")


def finetune_table(table: Any, where: str, section: str = "finetune") -> dict[str, Any]:
    """A compression command's [finetune] table (TrainConfig keys, plus `distill` from the
    uncompressed model), checked by TrainConfig itself before any work."""

    if not isinstance(table, dict):
        raise KilnError(f"{where}.{section}: needs a table")
    bad = sorted(set(table) - set(FINETUNE_KEYS))
    if bad:
        raise KilnError(f"{where}.{section}: unknown key {bad[0]!r}; accepted: {', '.join(FINETUNE_KEYS)}")
    if not isinstance(table.get("distill", False), bool):
        raise KilnError(f"{where}.{section}: distill needs true or false")
    from_dict(TrainConfig, {k: v for k, v in table.items() if k != "distill"} | {"model": "-"}, f"{where}.{section}")
    return dict(table)

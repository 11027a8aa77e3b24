"""Architecture spaces: CNN stages (channels, kernel sizes, blocks) and transformer shape
(depth, width, heads, FFN size, on the zoo's ViT), each candidate trained briefly and scored;
and a fixed-cost training-hyperparameter space (what the worker figure times).

    [space]
    kind = "cnn"                 # or "vit", or "train-hparams"
    dataset = "mnist"
    depth = [1, 2, 3]            # stages; per stage: channels, kernels, blocks (conditional params)
    steps = 150                  # optimizer steps per candidate
    compress = "configs/quant/w8a8.toml"   # optional: compression-aware, score the quantized model

A candidate reports its validation accuracy every `eval_every` steps with its costs (known
before training), so single-objective studies prune and multi-objective ones stop hopeless
candidates early. Best trials export as model.py (a `py:` factory) and train.toml for
`kiln train --config`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.config import read_toml, to_toml
from kiln.data import load_dataset
from kiln.errors import KilnError
from kiln.io import atomic_write_text
from kiln.models.zoo.vit import ViT
from kiln.quant.apply import report
from kiln.quant.config import parse_config
from kiln.quant.run import prepare
from kiln.search.objectives import cost_scores
from kiln.search.spaces import Report, Space, register_space
from kiln.train import tasks
from kiln.train.evaluation import calibration_batches


class ConvNet(nn.Module):
    """Stages of `blocks` x (conv k x k, BN, ReLU) then a 2x2 max-pool; global average pool and
    one linear classifier. `stages` is [(channels, kernel, blocks), ...]."""

    def __init__(self, stages: list[tuple[int, int, int]], in_channels: int = 1, classes: int = 10):
        super().__init__()
        layers, cin = [], in_channels
        for channels, kernel, blocks in stages:
            for _ in range(blocks):
                layers += [nn.Conv2d(cin, channels, kernel, padding=kernel // 2, bias=False),
                           nn.BatchNorm2d(channels), nn.ReLU()]
                cin = channels
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@dataclass(frozen=True)
class TrainBudget:
    """How each candidate is trained and scored (shared by the architecture spaces)."""
    dataset: str = "mnist"
    steps: int = 150
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    samples: int = 1000              # validation examples scored
    eval_every: int = 50
    compress: str = ""               # quant config TOML applied before scoring


@dataclass(frozen=True)
class CNNConfig(TrainBudget):
    depth: tuple[int, ...] = (1, 2, 3)
    channels: tuple[int, ...] = (8, 16, 32)
    kernels: tuple[int, ...] = (3, 5)
    blocks: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class ViTConfig(TrainBudget):
    depth: tuple[int, ...] = (1, 2, 3)
    dim: tuple[int, ...] = (32, 64)
    heads: tuple[int, ...] = (1, 2, 4)
    mlp_ratio: tuple[int, ...] = (1, 2, 4)
    patch: int = 7


@dataclass(frozen=True)
class HParamsConfig(TrainBudget):
    channels: tuple[int, ...] = (8, 16)     # the fixed ConvNet: one 3x3 block per stage
    lr_range: tuple[float, ...] = (1e-4, 3e-2)
    weight_decay_range: tuple[float, ...] = (1e-5, 1e-1)


class TrainedSpace(Space):
    """Loads the data once; trains a candidate for `steps`, reporting validation accuracy."""

    def setup(self) -> None:
        from torch.utils.data import Subset


        c = self.config
        for name, ok in (("steps", c.steps >= 1), ("batch_size", c.batch_size >= 1), ("samples", c.samples >= 1),
                         ("eval_every", c.eval_every >= 1)):
            if not ok:
                raise KilnError(f"{self.kind} space: {name} must be >= 1")
        self.splits = load_dataset(c.dataset, seed=self.ctx.seed)
        if self.splits.task != "classification" or self.splits.sample_shape is None:
            raise KilnError(f"{self.kind} space: dataset {c.dataset!r} is not an image classification set")
        self.val = Subset(self.splits.val, range(min(c.samples, len(self.splits.val))))
        self.example = (torch.randn(1, *self.splits.sample_shape),)

    def full_params(self, params: dict) -> dict:
        """A trial's parameters plus what the space fixes (data shape, fixed sizes)."""
        shape = self.splits.sample_shape
        return dict(params, in_channels=shape[0], classes=self.splits.num_classes, image_size=shape[-1])

    def build(self, params: dict) -> nn.Module:
        return build_candidate(self.kind, self.full_params(params))

    def score(self, params: dict, report: Report, lr: float | None = None,
              weight_decay: float | None = None) -> dict[str, float]:
        self.ensure_setup()
        torch.manual_seed(self.ctx.seed)
        model = self.build(params)
        costs = cost_scores(model, self.example, set(self.ctx.wanted), self.ctx.hardware)
        acc = train_briefly(model, self, lambda step, a: report(step, costs | {"accuracy": a}),
                            lr or self.config.lr, self.config.weight_decay if weight_decay is None else weight_decay)
        if self.config.compress:
            acc, costs = self.compressed(model, costs)
        return costs | {"accuracy": acc}

    def compressed(self, model: nn.Module, costs: dict) -> tuple[float, dict]:
        """Compression-aware scoring: quantize the trained candidate, then score that."""
        import copy

        from torch.utils.data import DataLoader

        float_model = copy.deepcopy(model)
        config = parse_config(read_toml(self.config.compress), self.config.compress)
        prepare(model, config, calibration_batches(self.splits, 4, 64, self.ctx.seed))
        rep = report(float_model, model, lambda m: None)
        acc = tasks.evaluate(model, "classification", DataLoader(self.val, batch_size=256),
                             tasks.metric_for("classification", model))
        return acc, costs | {"model_bytes": float(rep["model_bytes"]), "avg_bits": rep["avg_weight_bits"]}

    def export(self, params: dict, out: Path) -> list[Path]:
        self.ensure_setup()
        c = self.config
        params = self.full_params(params)
        model_py = out / "model.py"
        factory = (f'"""Trial of a `{self.kind}` architecture search."""\nimport torch\n\n'
                   f"from kiln.search.spaces.arch import build_candidate\n\nPARAMS = {json.dumps(params)}\n\n\n"
                   f"def factory():\n    model = build_candidate({self.kind!r}, PARAMS)\n"
                   f"    return model, (torch.randn(1, *{list(self.example[0].shape[1:])}),)\n")
        train = to_toml({"model": f"py:{model_py}:factory", "dataset": c.dataset, "out": str(out / "train"),
                         "epochs": 5, "lr": params.get("lr", c.lr), "batch_size": c.batch_size,
                         "weight_decay": params.get("weight_decay", c.weight_decay)})
        return [atomic_write_text(model_py, factory), atomic_write_text(out / "train.toml", train)]


def train_briefly(model: nn.Module, space: TrainedSpace, report, lr: float, weight_decay: float) -> float:
    """AdamW on cross-entropy for `steps` batches of a seeded shuffle; validation accuracy
    every `eval_every` steps (reported) and at the end (returned)."""
    from torch.utils.data import DataLoader


    c = space.config
    loader = DataLoader(space.splits.train, batch_size=c.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(space.ctx.seed))
    val = DataLoader(space.val, batch_size=256)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    step, acc = 0, float("nan")
    while step < c.steps:
        for x, y in loader:
            model.train()
            loss, _ = tasks.batch_loss(model, "classification", x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % c.eval_every == 0 or step == c.steps:
                acc = tasks.evaluate(model, "classification", val, tasks.metric_for("classification", model))
                if step < c.steps:
                    report(step, acc)
            if step == c.steps:
                break
    return acc


def _valid_depths(depths: tuple[int, ...], size: int) -> list[int]:
    """Stages that leave at least one pixel after their 2x2 pools."""
    return [d for d in depths if d >= 1 and size >> d >= 1]


@register_space("cnn")
class CNNSpace(TrainedSpace):
    Config = CNNConfig

    def check(self) -> None:
        c = self.config
        if not _valid_depths(c.depth, min(self.splits.sample_shape[1:])) or not c.channels or not c.kernels \
                or not c.blocks:
            raise KilnError(f"cnn space has no valid point: depth {list(c.depth)} on "
                            f"{self.splits.sample_shape} images, channels {list(c.channels)}, "
                            f"kernels {list(c.kernels)}, blocks {list(c.blocks)}")

    def suggest(self, trial) -> dict:
        self.ensure_setup()
        c = self.config
        depths = _valid_depths(c.depth, min(self.splits.sample_shape[1:]))
        params = {"depth": trial.suggest_categorical("depth", depths)}
        for i in range(params["depth"]):
            params[f"s{i}_channels"] = trial.suggest_categorical(f"s{i}_channels", list(c.channels))
            params[f"s{i}_kernel"] = trial.suggest_categorical(f"s{i}_kernel", list(c.kernels))
            params[f"s{i}_blocks"] = trial.suggest_categorical(f"s{i}_blocks", list(c.blocks))
        return params



def vit_heads(dim: int, heads: tuple[int, ...]) -> list[int]:
    return [h for h in heads if h >= 1 and dim % h == 0]


@register_space("vit")
class ViTSpace(TrainedSpace):
    Config = ViTConfig

    def check(self) -> None:
        c = self.config
        dims = [d for d in c.dim if vit_heads(d, c.heads)]
        if not dims or not c.depth or not c.mlp_ratio or self.splits.sample_shape[-1] % c.patch:
            raise KilnError(f"vit space has no valid point: no width in {list(c.dim)} is divisible by a "
                            f"head count in {list(c.heads)}, or patch {c.patch} does not tile the image")

    def suggest(self, trial) -> dict:
        self.ensure_setup()
        c = self.config
        dims = [d for d in c.dim if vit_heads(d, c.heads)]
        params = {"depth": trial.suggest_categorical("depth", list(c.depth)),
                  "dim": trial.suggest_categorical("dim", dims)}
        # heads depend on the width: a conditional parameter per width keeps every choice valid
        params["heads"] = trial.suggest_categorical(f"heads_dim{params['dim']}", vit_heads(params["dim"], c.heads))
        params["mlp_ratio"] = trial.suggest_categorical("mlp_ratio", list(c.mlp_ratio))
        return params

    def full_params(self, params: dict) -> dict:
        return super().full_params(params) | {"patch": self.config.patch}


@register_space("train-hparams")
class HParamsSpace(TrainedSpace):
    Config = HParamsConfig

    def suggest(self, trial) -> dict:
        c = self.config
        return {"lr": trial.suggest_float("lr", *c.lr_range, log=True),
                "weight_decay": trial.suggest_float("weight_decay", *c.weight_decay_range, log=True)}

    def full_params(self, params: dict) -> dict:
        stages = {"depth": len(self.config.channels)}
        for i, ch in enumerate(self.config.channels):
            stages |= {f"s{i}_channels": ch, f"s{i}_kernel": 3, f"s{i}_blocks": 1}
        return super().full_params(params) | stages

    def score(self, params: dict, report: Report, lr=None, weight_decay=None) -> dict[str, float]:
        return super().score(params, report, lr=params["lr"], weight_decay=params["weight_decay"])


def build_candidate(kind: str, params: dict[str, Any]) -> nn.Module:
    """The module a trial's full parameters describe (also what exported model.py files call)."""
    in_channels, classes = params.get("in_channels", 1), params.get("classes", 10)
    if kind in ("cnn", "train-hparams"):
        stages = [(params[f"s{i}_channels"], params[f"s{i}_kernel"], params[f"s{i}_blocks"])
                  for i in range(params["depth"])]
        return ConvNet(stages, in_channels, classes)

    heads = params.get("heads") or next(v for k, v in params.items() if k.startswith("heads_dim"))
    return ViT(image_size=params.get("image_size", 28), patch=params.get("patch", 7), in_channels=in_channels,
               classes=classes, dim=params["dim"], depth=params["depth"], heads=heads,
               mlp_ratio=params["mlp_ratio"])

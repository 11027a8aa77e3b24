"""LoRA and QLoRA: low-rank adapters on a frozen base (Hu et al. 2021, arXiv 2106.09685;
QLoRA, Dettmers et al. 2023, arXiv 2305.14314), exact against PEFT.

`y = base(x) + B(A(dropout(x))) * scaling`, scaling = alpha / r (alpha / sqrt(r) with rsLoRA,
Kalajdzievski 2023). A starts as nn.Linear's Kaiming-uniform (a = sqrt(5)), B at zero, so the
adapted model equals the base at the start; modules are created in the order and with the
random draws that PEFT 0.21 uses, so one seed gives PEFT's adapters (tests/test_lora.py).
`targets = ["all-linear"]` takes every Linear but a transformers model's output embedding (PEFT's
rule); other targets match a module's full name or its dotted suffix. `bias`: which biases train
(none, those of adapted layers, all). `train`: modules trained in full (PEFT's
modules_to_save), e.g. a new classification head. With `qlora` the base weights are NF4
(kiln.lowrank.nf4) and merging gives a float Linear from the dequantized base.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import nn

from kiln.config import from_dict, to_dict
from kiln.errors import KilnError
from kiln.lowrank.nf4 import NF4Linear
from kiln.runs.artifact import load_artifact, save_artifact
from kiln.runs.transforms import TransformRecord, register_transform
from kiln.train.trainer import PREPARES

KIND = "lora"
ALL_LINEAR = "all-linear"


class Bias(enum.StrEnum):
    """Which biases train beside the adapters (PEFT's `bias`)."""
    NONE = "none"
    LORA_ONLY = "lora_only"
    ALL = "all"


@dataclass(frozen=True)
class LoraConfig:
    VERSION = 1
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = (ALL_LINEAR,)
    bias: Bias = Bias.NONE
    rslora: bool = False
    train: tuple[str, ...] = ()      # modules trained in full (PEFT's modules_to_save)
    qlora: bool = False              # NF4 base weights
    block: int = 64                  # QLoRA: weights per absmax scale
    scaler_block: int = 256          # QLoRA: scales per double-quantization factor

    def __post_init__(self):
        checks = [(self.r >= 1, f"r must be >= 1, got {self.r}"),
                  (self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
                  (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
                  (bool(self.targets), "targets must name at least one module (or all-linear)"),
                  (self.block >= 2 and self.block % 2 == 0, f"block must be an even number >= 2, got {self.block}"),
                  (self.scaler_block >= 1, f"scaler_block must be >= 1, got {self.scaler_block}")]
        for ok, message in checks:
            if not ok:
                raise KilnError(f"lora: {message}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


def parse(text: str, qlora: bool = False) -> LoraConfig:
    """`r=8,alpha=16,dropout=0.05,targets=query+value,bias=lora_only,rslora=1,train=head` (list
    values joined with `+`); empty text gives the defaults."""
    table: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise KilnError(f"--lora: {item!r} is not key=value (e.g. r=8,alpha=16)")
        key = key.strip()
        if key in ("targets", "train"):
            table[key] = [v for v in value.split("+") if v]
        elif key in ("rslora", "qlora"):
            table[key] = value.strip().lower() in ("1", "true", "yes")
        elif key in ("r", "block", "scaler_block"):
            table[key] = _number(key, value, int)
        elif key in ("alpha", "dropout"):
            table[key] = _number(key, value, float)
        else:
            table[key] = value.strip()
    if qlora:
        table["qlora"] = True
    return from_dict(LoraConfig, table, "--lora")


def _number(key: str, value: str, kind):
    try:
        return kind(value)
    except ValueError:
        raise KilnError(f"--lora: {key}={value!r} is not a{'n integer' if kind is int else ' number'}") from None


class LoraLinear(nn.Module):
    """A frozen base Linear (float or NF4) plus a trainable rank-r update."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # PEFT's order of construction and initialisation, so one seed gives the same adapters
        self.lora_A = nn.Linear(self.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.r, self.scaling = r, scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update the adapter adds to the base weight: B A * scaling."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight.detach().float() + self.delta())
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias.detach())
        return linear

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


def _output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The Linear modules the config adapts, in the model's module order."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
    if ALL_LINEAR in config.targets:
        head = _output_embedding(model)
        chosen = [n for n in linears if model.get_submodule(n) is not head]
    else:
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in config.targets)]
        matched = {t for t in config.targets for n in linears if n == t or n.endswith("." + t)}
        missing = [t for t in config.targets if t not in matched]
        if missing:
            shown = ", ".join(sorted({n.rpartition(".")[2] for n in linears})[:12])
            raise KilnError(f"lora target {missing[0]!r} matches no Linear of the model; Linear names: {shown}")
    if not chosen:
        raise KilnError("lora: the model has no Linear layer to adapt" + (" or quantize to NF4" if config.qlora else ""))
    for name in chosen:
        layer = model.get_submodule(name)
        if config.r > min(layer.in_features, layer.out_features):
            raise KilnError(f"lora rank {config.r} exceeds {name}'s size {layer.out_features}x{layer.in_features} "
                            f"(at most {min(layer.in_features, layer.out_features)})")
    return chosen


def _set(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, leaf = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _build(model: nn.Module, config: LoraConfig, fqns: list[str]) -> None:
    for fqn in fqns:
        layer = model.get_submodule(fqn)
        base = NF4Linear.from_linear(layer, config.block, config.scaler_block) if config.qlora else layer
        _set(model, fqn, LoraLinear(base, config.r, config.scaling, config.dropout))


def set_trainable(model: nn.Module, config: LoraConfig) -> None:
    """Adapters train; the base is frozen but for the biases `bias` names and the `train` modules."""
    for name, p in model.named_parameters():
        p.requires_grad = "lora_A." in name or "lora_B." in name or (config.bias is Bias.ALL and name.endswith("bias"))
    for m in model.modules():
        if isinstance(m, LoraLinear) and config.bias is Bias.LORA_ONLY and m.base.bias is not None:
            m.base.bias.requires_grad = True
    for fqn in config.train:
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            raise KilnError(f"lora train= names {fqn!r}, which the model does not have") from None
        for p in module.parameters():
            p.requires_grad = True


def apply(model: nn.Module, config: LoraConfig) -> TransformRecord:
    """Adapt `model` in place; the record rebuilds the architecture (weights load after)."""
    fqns = targets(model, config)
    _build(model, config, fqns)
    set_trainable(model, config)
    return TransformRecord(KIND, LoraConfig.VERSION, {"config": to_dict(config), "modules": fqns})


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, as PEFT's `get_nb_trainable_parameters` counts them
    (an NF4 weight counts its weights, not its bytes)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    nf4 = sum(m.base.weight_nf4.numel for m in model.modules() if isinstance(m, LoraLinear) and isinstance(m.base, NF4Linear))
    return trainable, sum(p.numel() for p in model.parameters()) + nf4


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base: plain Linear layers (float, from a dequantized NF4 base)."""
    for fqn, m in list(model.named_modules()):
        if isinstance(m, LoraLinear):
            _set(model, fqn, m.merged())
    return model


def bits_report(model: nn.Module) -> dict:
    """What QLoRA's storage costs: NF4 bits per base weight and the adapters' share."""
    nf4 = [m.base.weight_nf4 for m in model.modules() if isinstance(m, LoraLinear) and isinstance(m.base, NF4Linear)]
    weights = sum(w.numel for w in nf4)
    return {"nf4_weights": weights,
            "nf4_bits_per_weight": sum(w.bits_per_weight() * w.numel for w in nf4) / weights if weights else None}


def merge_run(run_dir, out) -> dict:
    """A LoRA run's model with its adapters folded in, saved as a run of the plain architecture
    (the transforms before LoRA); the largest output change on the example input is reported."""
    source = load_artifact(run_dir)
    kinds = [t.kind for t in source.transforms]
    if KIND not in kinds:
        raise KilnError(f"{run_dir} has no LoRA adapters to merge (its transforms: {', '.join(kinds) or 'none'})")
    if kinds[-1] != KIND:
        raise KilnError(f"{run_dir}: LoRA is followed by {kinds[-1]}; only a run whose last transform is LoRA merges")
    adapters = sum(isinstance(m, LoraLinear) for m in source.model.modules())
    with torch.no_grad():
        before = source.model(*source.example_inputs, **source.example_kwargs)
        model = merge(source.model)
        after = model(*source.example_inputs, **source.example_kwargs)
    diff = float((before - after).abs().max()) if isinstance(before, torch.Tensor) else None
    report = {"merged_from": str(run_dir), "adapters": adapters, "max_abs_output_change": diff}
    save_artifact(out, model, spec=source.spec, dataset=source.dataset, transforms=source.transforms[:-1],
                  data_seed=source.data_seed, report=report)
    return {"run": str(run_dir), "out": str(out), **report}


@register_transform(KIND)
def restore(model: nn.Module, record: dict) -> nn.Module:
    config = from_dict(LoraConfig, record.get("config", {}), "lora transform record")
    fqns = record.get("modules")
    if not isinstance(fqns, list):
        raise KilnError("lora transform record needs a 'modules' list")
    for fqn in fqns:
        try:
            model.get_submodule(fqn)
        except AttributeError:
            raise KilnError(f"lora record names {fqn!r}, which the model does not have") from None
    _build(model, config, fqns)
    set_trainable(model, config)
    return model


@PREPARES.register(KIND)
def prepare_for_training(model: nn.Module, cfg, splits) -> TransformRecord:
    """`kiln train --lora ...` / `--qlora`: adapt the model before the optimizer is built."""
    return apply(model, parse(cfg.lora, qlora=cfg.qlora))

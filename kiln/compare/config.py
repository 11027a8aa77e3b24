"""What `kiln compare` runs: the models, the optimisations (each one capability and its
config table, data rather than code), the hardware profiles and the short trainings."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import KilnError
from kiln.hardware.profiles import available
from kiln.models.zoo import ZOO
from kiln.registry import Registry


class Capability(enum.StrEnum):
    """Which kiln command makes the optimised artifact."""
    QUANT = "quant"        # kiln.quant.run.quantize_run
    PRUNE = "prune"        # kiln.prune.run.prune_run
    LOWRANK = "lowrank"    # kiln.lowrank.run.lowrank_run
    PASSES = "passes"      # kiln.compile.default_passes over the captured graph


@dataclass(frozen=True)
class Optimization:
    """One column of the matrix: a capability, its config table (the same TOML table the
    command reads) and whether a recovery fine-tune follows it."""

    name: str
    capability: Capability
    table: dict[str, Any] = field(default_factory=dict)
    finetune: bool = False          # a short recovery fine-tune (kiln.train.finetune) after it
    weight_quant: bool = False      # stores weights in fewer bits (the observations group by it)
    description: str = ""


OPTIMIZATIONS: Registry[Optimization] = Registry("optimisation")


def _add(opt: Optimization) -> None:
    OPTIMIZATIONS.register(opt.name)(opt)


# W8A8 as configs/quant/w8a8.toml; fp8 E4M3 and OCP MXFP4 (E2M1 elements, an E8M0 scale per 32)
# likewise for weights and inputs: the formats an H100 (fp8) and a Blackwell part (fp4) compute in
_add(Optimization("int8", Capability.QUANT, {
    "weight": {"format": "int", "bits": 8, "granularity": "channel"},
    "input": {"format": "int", "bits": 8, "granularity": "tensor", "calib": "minmax"}},
    weight_quant=True, description="int8 weights per channel, int8 activations per tensor (W8A8)"))
_add(Optimization("fp8", Capability.QUANT, {"weight": "fp8_e4m3", "input": "fp8_e4m3"}, weight_quant=True,
                  description="fp8 E4M3 weights and activations"))
# MX blocks of 32 run along a matmul's reduction dimension: a convolution's last weight
# dimension (its kernel width, 3 in a 3x3) cannot hold one, so MXFP4 takes the Linears only
_add(Optimization("mxfp4", Capability.QUANT, {"weight": "mxfp4", "input": "mxfp4", "targets": ["Linear"]},
                  weight_quant=True, description="OCP MXFP4 weights and activations of every Linear (4.25 bits)"))
_add(Optimization("2:4", Capability.PRUNE, {"method": "nm", "n": 2, "m": 4}, finetune=True,
                  description="2:4 semi-structured sparsity by magnitude, then a recovery fine-tune"))
_add(Optimization("structured50", Capability.PRUNE, {"method": "structured", "criterion": "magnitude",
                                                     "ratio": 0.5}, finetune=True,
                  description="half of every channel/head/neuron group removed by L1 norm, then fine-tuned"))
_add(Optimization("lowrank", Capability.LOWRANK, {"budget": 0.5, "latency_batch": 1, "latency_repeats": 1},
                  finetune=True, description="truncated SVD/Tucker to half the weights, then fine-tuned"))
_add(Optimization("passes", Capability.PASSES, {}, description="the compiler's default graph passes "
                  "(simplify, CSE, constant and batch-norm folding, attention, fusion, DCE)"))

@dataclass(frozen=True)
class Recipe:
    """How one model's base is trained before it is optimised: the trainer's own settings, as
    data. A value the command line gives (--train-steps, --train-lr, --finetune-*) wins over the
    recipe's; None: the command line's default (DEFAULT_TRAINING). A step is
    one optimizer step (karate's one graph is one batch: 200 steps are 200 epochs)."""

    steps: int | None = None
    lr: float | None = None
    dataset: str = ""              # "" the zoo model's default dataset
    classes: int | None = None     # a fresh N-way head on the zoo's pretrained body (zoo:NAME?classes=N)
    finetune_steps: int | None = None
    finetune_lr: float | None = None
    note: str = ""                 # why, for the reader of the base cell


# Set where the command line's defaults (200 steps at 5e-4, batch 32) leave a model that has
# not learned, or cost more than the matrix can spend. Test metrics they reached (2026-12-08,
# `kiln compare --no-latency`, the report's "Base models"): cnn 0.958, resnet20 0.984, mobilenet_v2
# 0.972, vit_tiny 0.794, minilm_cls 0.756 (2 classes), gpt perplexity 11.6, gcn 0.875 (4 classes,
# 8 test nodes), c3d 0.852. Models absent here train with the command line's values.
RECIPES: dict[str, Recipe] = {
    "zoo:resnet20": Recipe(steps=300, lr=1e-3),
    "zoo:mobilenet_v2": Recipe(steps=200, lr=1e-3, dataset="mnist?size=32&channels=3", classes=10,
                               note="no ImageNet images ship here: torchvision's ImageNet weights with a fresh "
                                    "10-way head, fine-tuned on MNIST at 32x32 RGB; costs at its 224x224 input"),
    "zoo:vit_tiny": Recipe(steps=600, lr=1e-3, note="a ViT needs more steps than a CNN on MNIST"),
    "zoo:minilm_cls": Recipe(steps=100, lr=5e-5, dataset="rotten-tomatoes?max_length=32", finetune_steps=30,
                             finetune_lr=3e-5, note="the pretrained all-MiniLM-L6-v2 encoder and a fresh head, "
                             "fine-tuned at BERT's learning rate; reviews cut to 32 tokens (costs at 64)"),
    "zoo:gpt": Recipe(steps=300, lr=1e-3),
    "zoo:gcn": Recipe(steps=200, lr=1e-2, finetune_lr=5e-3,
                      note="Kipf & Welling's GCN recipe: full-graph steps at lr 0.01"),
    "zoo:c3d": Recipe(steps=150, lr=1e-3, dataset="moving-mnist?size=32",
                      note="clips of 16 frames at 32x32 (costs at its 64x64 input), to keep training affordable"),
}

# what a model trains with when neither the command line nor its recipe says
DEFAULT_TRAINING = {"train_steps": 200, "train_lr": 5e-4, "finetune_steps": 50, "finetune_lr": 1e-4}

BASELINE = "none"   # the row each optimisation is compared against: the (briefly trained) model itself
DEFAULT_MODELS = ("zoo:cnn", "zoo:resnet20", "zoo:mobilenet_v2", "zoo:vit_tiny", "zoo:minilm_cls", "zoo:gpt",
                  "zoo:gcn", "zoo:vae", "zoo:ddpm", "zoo:c3d")
DEFAULT_HARDWARE = ("local", "a100", "h100", "rpi4", "alveo-u250")


@dataclass(frozen=True)
class CompareConfig:
    """The matrix and how hard each cell works. `train_steps` 0: the zoo's own weights (its
    pretrained ones where it has them); `finetune_steps` 0: no recovery fine-tune. The four
    training values left None: each model's recipe, else DEFAULT_TRAINING."""

    models: tuple[str, ...] = DEFAULT_MODELS
    optimizations: tuple[str, ...] = tuple(OPTIMIZATIONS.names())
    hardware: tuple[str, ...] = DEFAULT_HARDWARE
    train_steps: int | None = None
    train_lr: float | None = None
    finetune_steps: int | None = None
    finetune_lr: float | None = None
    batch_size: int = 32
    calib_batches: int = 4
    latency: bool = True             # measure latency here with `kiln compile --backend`
    backend: str = "auto"
    rounds: int = 5
    recipes: bool = True             # per-model training (RECIPES) over the command line's values

    def recipe(self, model: str) -> Recipe:
        """The training this run gives `model`'s base: the command line's values where it gives
        them, else the model's recipe, else DEFAULT_TRAINING."""
        r = RECIPES.get(model, Recipe()) if self.recipes else Recipe()

        def pick(given, recipe, key):
            return given if given is not None else recipe if recipe is not None else DEFAULT_TRAINING[key]
        return Recipe(pick(self.train_steps, r.steps, "train_steps"), pick(self.train_lr, r.lr, "train_lr"),
                      r.dataset, r.classes, pick(self.finetune_steps, r.finetune_steps, "finetune_steps"),
                      pick(self.finetune_lr, r.finetune_lr, "finetune_lr"), r.note)

    def __post_init__(self):
        for flag, value in (("--train-steps", self.train_steps), ("--finetune-steps", self.finetune_steps)):
            if value is not None and value < 0:
                raise KilnError(f"{flag} must be >= 0, got {value}")
        for flag, value in (("--batch-size", self.batch_size), ("--calib-batches", self.calib_batches),
                            ("--rounds", self.rounds)):
            if value < 1:
                raise KilnError(f"{flag} must be >= 1, got {value}")
        for flag, value in (("--train-lr", self.train_lr), ("--finetune-lr", self.finetune_lr)):
            if value is not None and not value > 0:
                raise KilnError(f"{flag} must be > 0, got {value}")
        if not self.models or not self.optimizations or not self.hardware:
            raise KilnError("compare needs at least one model, one optimisation and one hardware profile")


def _names(text: str | tuple | list, what: str) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(dict.fromkeys(s.strip() for s in items if s.strip()))
    if not names:
        raise KilnError(f"--{what} is empty: give a comma-separated list")
    return names


def check_models(models: tuple[str, ...]) -> None:
    """Zoo specs must name a zoo model (the error lists them); other specs fail when loaded."""
    for spec in models:
        if spec.startswith("zoo:"):
            name = spec[4:].partition("?")[0]
            if name not in ZOO.names():
                raise KilnError(f"unknown model {spec!r}; known: {', '.join('zoo:' + n for n in ZOO.names())}")
        elif ":" not in spec:
            raise KilnError(f"unknown model {spec!r}: give a zoo:NAME spec (known: "
                            f"{', '.join('zoo:' + n for n in ZOO.names())}) or another model spec")


def check_hardware(names: tuple[str, ...]) -> None:
    known = sorted({*available(), "local"})
    for name in names:
        if name not in known:
            raise KilnError(f"unknown hardware profile {name!r}; known: {', '.join(known)}")


def parse_config(models: str | list, optimizations: str | list, hardware: str | list, **kw) -> CompareConfig:
    """A CompareConfig from the command line's comma lists; every unknown name is a one-line
    KilnError listing the known ones, before any work."""
    ms, os_, hw = _names(models, "models"), _names(optimizations, "optimizations"), _names(hardware, "hardware")
    if BASELINE in os_:
        raise KilnError(f"optimisation {BASELINE!r} is the baseline every row is compared with, always run; "
                        f"known: {', '.join(OPTIMIZATIONS.names())}")
    for name in os_:
        if name not in OPTIMIZATIONS.names():
            raise KilnError(f"unknown optimisation {name!r}; known: {', '.join(OPTIMIZATIONS.names())}")
    check_models(ms)
    check_hardware(hw)
    return CompareConfig(ms, os_, hw, **kw)

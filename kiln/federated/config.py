"""`kiln federate --config fl.toml`: one frozen config, a nested table per concern.

```toml
model = "zoo:mlp"
dataset = "mnist"            # empty: the model's own
rounds = 3
clients = 10
seed = 0
engine = "simulation"        # Flower's simulation engine | inprocess | deployment
secagg = false               # Flower's SecAgg+ (fedavg only)
lora = ""                    # e.g. "r=8,alpha=16,targets=query+value,train=head": only adapters travel
eval_samples = 0             # the server scores a seeded subset of the test split (0: all of it)
[partition]                  # how the training split is cut across the clients
kind = "dirichlet"           # iid | dirichlet | pathological | quantity
alpha = 0.5
[strategy]                   # a Flower strategy
name = "fedavg"              # fedavg fedprox fedadam fedyogi fedadagrad fedmedian fedtrimmedavg krum multikrum
fraction_train = 1.0
[local]                      # each client's training (kiln.train's optimizers and losses)
epochs = 1
[compression]                # the update (client model minus global model) each client sends
format = "int8"              # none | a kiln.quant format preset (int8, int4, fp8_e4m3, mxint8...) | topk
[privacy]                    # Flower's DP wrappers, epsilon by Opacus's RDP accountant
mode = "central"             # none | central | client
[attack]                     # malicious clients, for robustness experiments
kind = "sign_flip"           # none | sign_flip | scaled | label_flip
```
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kiln.errors import KilnError


class Partitioner(enum.StrEnum):
    IID = "iid"
    DIRICHLET = "dirichlet"          # label proportions ~ Dir(alpha) per client
    PATHOLOGICAL = "pathological"    # each client holds `labels_per_client` labels
    QUANTITY = "quantity"            # client sizes ~ Dir(alpha), labels IID


class StrategyName(enum.StrEnum):
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    FEDMEDIAN = "fedmedian"
    FEDTRIMMEDAVG = "fedtrimmedavg"
    KRUM = "krum"
    MULTIKRUM = "multikrum"


class PrivacyMode(enum.StrEnum):
    NONE = "none"
    CENTRAL = "central"    # DifferentialPrivacyServerSideFixedClipping: server clips and noises
    CLIENT = "client"      # DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod


class Attack(enum.StrEnum):
    NONE = "none"
    SIGN_FLIP = "sign_flip"    # sends global - scale * update
    SCALED = "scaled"          # sends global + scale * update
    LABEL_FLIP = "label_flip"  # trains on label C-1-y


class Engine(enum.StrEnum):
    SIMULATION = "simulation"   # Flower's simulation engine: run_simulation, ClientApps in Ray actors
    DEPLOYMENT = "deployment"   # a SuperLink and N SuperNodes as processes (flower-superlink/-supernode)
    INPROCESS = "inprocess"     # the same apps called in this process, one client after another:
    # Flower's engine spends about a minute here starting Ray and its actors (each imports torch
    # and loads the data) before round 1, where a short test or a sweep of short runs needs
    # seconds; tests/test_federated.py checks that it gives Flower's engine's parameters


def _check(checks: list[tuple[bool, str]], where: str) -> None:
    for ok, message in checks:
        if not ok:
            raise KilnError(f"{where}: {message}")


@dataclass(frozen=True)
class PartitionConfig:
    kind: Partitioner = Partitioner.IID
    alpha: float = 0.5                  # Dirichlet concentration (dirichlet, quantity)
    labels_per_client: int = 2          # pathological
    min_size: int = 10                  # dirichlet/quantity: resample until every client has this many

    def __post_init__(self):
        _check([(self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
                (self.labels_per_client >= 1, "labels_per_client must be >= 1"),
                (self.min_size >= 1, "min_size must be >= 1")], "partition")


@dataclass(frozen=True)
class StrategyConfig:
    name: StrategyName = StrategyName.FEDAVG
    fraction_train: float = 1.0         # clients sampled per round: max(fraction * clients, min_train_clients)
    min_train_clients: int = 2
    fraction_evaluate: float = 0.0      # client-side evaluation of the global model on local data
    proximal_mu: float = 0.01           # fedprox
    server_lr: float = 0.1              # fedadam/fedyogi/fedadagrad: eta
    tau: float = 1e-3                   # fedadam/fedyogi/fedadagrad: adaptivity
    trim_beta: float = 0.2              # fedtrimmedavg: fraction cut at each end
    byzantine: int = 0                  # krum/multikrum: clients assumed malicious
    keep: int = 0                       # multikrum: updates averaged (0: clients - byzantine)

    def __post_init__(self):
        _check([(0 < self.fraction_train <= 1, f"fraction_train must be in (0, 1], got {self.fraction_train}"),
                (0 <= self.fraction_evaluate <= 1, "fraction_evaluate must be in [0, 1]"),
                (self.min_train_clients >= 1, "min_train_clients must be >= 1"),
                (self.proximal_mu >= 0, "proximal_mu must be >= 0"),
                (self.server_lr > 0 and self.tau > 0, "server_lr and tau must be > 0"),
                (0 <= self.trim_beta < 0.5, "trim_beta must be in [0, 0.5)"),
                (self.byzantine >= 0 and self.keep >= 0, "byzantine and keep must be >= 0")], "strategy")


@dataclass(frozen=True)
class LocalConfig:
    """One client's training per round (a kiln.train optimizer and the task's loss)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.02
    optimizer: str = "sgd"              # a name in kiln.train.optimizers (kiln's sgd is Nesterov: momentum > 0)
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_steps: int = 0                  # per round (0: whole epochs)

    def __post_init__(self):
        _check([(self.epochs >= 1, "epochs must be >= 1"), (self.batch_size >= 1, "batch_size must be >= 1"),
                (self.lr > 0, "lr must be > 0"), (self.max_steps >= 0, "max_steps must be >= 0"),
                (self.optimizer != "sgd" or self.momentum > 0, "optimizer sgd (Nesterov) needs momentum > 0")], "local")


@dataclass(frozen=True)
class UpdateCompressionConfig:
    """What travels uplink: the update quantized with a kiln.quant format, or its top-k entries."""

    format: str = "none"                # none | topk | a kiln.quant preset (int8, int4, fp8_e4m3, mxint8, ...)
    topk_fraction: float = 0.01
    error_feedback: bool = False        # carry each client's compression error into its next update

    def __post_init__(self):
        _check([(0 < self.topk_fraction <= 1, f"topk_fraction must be in (0, 1], got {self.topk_fraction}")],
               "compression")


@dataclass(frozen=True)
class PrivacyConfig:
    mode: PrivacyMode = PrivacyMode.NONE
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5

    def __post_init__(self):
        _check([(self.noise_multiplier >= 0, "noise_multiplier must be >= 0"),
                (self.clipping_norm > 0, "clipping_norm must be > 0"),
                (0 < self.delta < 1, "delta must be in (0, 1)")], "privacy")


@dataclass(frozen=True)
class AttackConfig:
    kind: Attack = Attack.NONE
    clients: int = 0                    # the first `clients` partitions are malicious
    scale: float = 10.0                 # sign_flip / scaled: the update's factor

    def __post_init__(self):
        _check([(self.clients >= 0, "clients must be >= 0")], "attack")


@dataclass(frozen=True)
class FederateConfig:
    model: str
    dataset: str = ""
    rounds: int = 3
    clients: int = 4
    seed: int = 0
    engine: Engine = Engine.SIMULATION
    superlink: str = ""                 # deployment: host:port of a running SuperLink (empty: start one here)
    eval_batch_size: int = 256
    threads: int = 0
    secagg: bool = False                # Flower's SecAgg+ (see kiln.federated.run.check_config)
    lora: str = ""                      # LoRA adapters on the frozen model (`kiln train --lora` syntax,
    # e.g. "r=8,alpha=16,targets=query+value,train=head"): only the trainable tensors travel
    eval_samples: int = 0               # the server evaluates this many test rows (a seeded subset; 0: all)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    compression: UpdateCompressionConfig = field(default_factory=UpdateCompressionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)

    def __post_init__(self):
        _check([(self.rounds >= 1, "rounds must be >= 1"), (self.clients >= 1, "clients must be >= 1"),
                (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
                (self.threads >= 0, "threads must be >= 0"),
                (self.eval_samples >= 0, "eval_samples must be >= 0"),
                (self.attack.clients <= self.clients,
                 f"attack.clients ({self.attack.clients}) exceeds clients ({self.clients})")], "federate")

    @property
    def sampled(self) -> int:
        """Clients trained per round: Flower's rule max(int(n * fraction), min_train_nodes)."""
        return max(int(self.clients * self.strategy.fraction_train), self.strategy.min_train_clients)

    def check_sampling(self) -> None:
        """A fraction that leaves no client, or a minimum above the clients there are."""
        picked = int(self.clients * self.strategy.fraction_train)
        if picked < 1:
            raise KilnError(f"strategy.fraction_train {self.strategy.fraction_train} of {self.clients} clients leaves "
                            f"no client (int({self.clients} * {self.strategy.fraction_train}) = 0)")
        if self.sampled > self.clients:
            raise KilnError(f"strategy: {self.sampled} clients per round (fraction_train {self.strategy.fraction_train}, "
                            f"min_train_clients {self.strategy.min_train_clients}) but only {self.clients} clients")

"""What server and clients share: the model, the data and its partition, built once per process
from the config, and the local training step (kiln.train's optimizers and task losses)."""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from kiln.config import from_dict
from kiln.data import load_dataset
from kiln.errors import KilnError
from kiln.federated.config import Attack, FederateConfig, LocalConfig
from kiln.federated.partition import partition, split_labels
from kiln.lowrank import lora
from kiln.runs.artifact import Source, default_dataset, load_source
from kiln.train import tasks
from kiln.train.config import TrainConfig
from kiln.train.evaluation import eval_loader
from kiln.train.optimizers import build_optimizer
from kiln.train.trainer import check_fit


@dataclass
class Federation:
    """The model (one instance, reloaded with each message's weights), the dataset and each
    client's rows of its training split."""

    cfg: FederateConfig
    source: Source
    splits: object          # kiln.data.DataSplits
    dataset: str
    labels: np.ndarray      # of the training split
    rows: list[np.ndarray]  # per client

    @property
    def model(self) -> nn.Module:
        return self.source.model

    def float_keys(self) -> list[str]:
        return [k for k, v in self.model.state_dict().items() if v.is_floating_point() and k in self.shared]

    @functools.cached_property
    def shared(self) -> frozenset[str]:
        """The state-dict keys that travel: all of them, or with LoRA the trainable ones (every
        node builds the same frozen base from the spec)."""
        if not self.cfg.lora:
            return frozenset(self.model.state_dict())
        return frozenset(n for n, p in self.model.named_parameters() if p.requires_grad)

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if k in self.shared}

    def load_shared(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=not self.cfg.lora)


def dataset_of(cfg: FederateConfig, source: Source) -> str:
    if cfg.dataset:
        return cfg.dataset
    if source.dataset:
        return source.dataset
    return default_dataset(cfg.model)


@functools.lru_cache(maxsize=2)
def federation(cfg: FederateConfig) -> Federation:
    """Built once per process and config: every virtual client of a simulation shares it."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    source = load_source(cfg.model)
    dataset = dataset_of(cfg, source)
    splits = load_dataset(dataset, seed=cfg.seed)
    if splits.task != "classification":
        raise KilnError(f"dataset {dataset} is a {splits.task} task: federated learning here needs a classification dataset")
    check_fit(source.model, splits, cfg.model, dataset)
    if cfg.lora:
        source.transforms.append(lora.apply(source.model, lora.parse(cfg.lora)))   # the artifact rebuilds it
    if cfg.eval_samples and cfg.eval_samples < len(splits.test):
        rows = np.random.default_rng(cfg.seed).permutation(len(splits.test))[:cfg.eval_samples]
        splits = dataclasses.replace(splits, test=Subset(splits.test, sorted(rows.tolist())))
    labels = split_labels(splits.train)
    rows = partition(labels, cfg.clients, cfg.partition, cfg.seed)
    source.model.train()
    return Federation(cfg, source, splits, dataset, labels, rows)


def local_train_config(local: LocalConfig) -> TrainConfig:
    """The kiln.train config whose optimizer a client builds (its registry, its checks)."""
    return from_dict(TrainConfig, {"model": "-", "optimizer": local.optimizer, "lr": local.lr,
                                   "momentum": local.momentum, "weight_decay": local.weight_decay,
                                   "batch_size": local.batch_size, "epochs": local.epochs}, "local")


def client_seed(seed: int, round_: int, client: int) -> int:
    """Each client's data order and dropout in each round: the same in every engine."""
    return (seed * 1_000_003 + round_ * 10_007 + client) % (2 ** 31)


def local_train(fed: Federation, client: int, round_: int, global_state: dict[str, torch.Tensor],
                proximal_mu: float) -> dict[str, float]:
    """Train `fed.model` (already holding `global_state`) on the client's rows; FedProx adds
    (mu / 2) * ||w - w_global||^2 to the loss (Li et al. 2020, arXiv 1812.06127, eq. 2)."""
    cfg, local = fed.cfg, fed.cfg.local
    model = fed.model
    torch.manual_seed(client_seed(cfg.seed, round_, client))
    data = Subset(fed.splits.train, fed.rows[client].tolist())
    loader = DataLoader(data, batch_size=local.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(client_seed(cfg.seed, round_, client)))
    flip = cfg.attack.kind == Attack.LABEL_FLIP and client < cfg.attack.clients
    classes = fed.splits.num_classes or 0
    opt = build_optimizer(local_train_config(local), model)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    anchors = [global_state[n].detach() for n, _ in trained] if proximal_mu else []
    model.train()
    steps, seen, loss_sum, correct = 0, 0, 0.0, 0
    for _ in range(local.epochs):
        for x, y in loader:
            if local.max_steps and steps >= local.max_steps:
                break
            if flip:
                y = classes - 1 - y
            loss, stats = tasks.batch_loss(model, "classification", x, y)
            if proximal_mu:
                prox = sum(((p - a) ** 2).sum() for (_, p), a in zip(trained, anchors))
                loss = loss + proximal_mu / 2 * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n = tasks.batch_size(x)
            steps, seen = steps + 1, seen + n
            loss_sum += stats["loss"] * n
            correct += stats["sum"]
    if not math.isfinite(loss_sum):
        raise KilnError(f"client {client}: local training diverged (loss {loss_sum}); lower local.lr")
    return {"num-examples": len(data), "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1), "steps": steps}


@torch.no_grad()
def evaluate_split(fed: Federation, ds) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `fed.model` on a dataset."""
    model = fed.model
    was = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in eval_loader(ds, "classification", fed.cfg.eval_batch_size):
        loss, stats = tasks.logits_loss(tasks.forward(model, x), "classification", y)
        loss_sum += loss.item() * stats["count"]
        correct += stats["sum"]
        n += stats["count"]
    model.train(was)
    return correct / max(n, 1), loss_sum / max(n, 1)


def client_dataset(fed: Federation, client: int):
    return Subset(fed.splits.train, fed.rows[client].tolist())

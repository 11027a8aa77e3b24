"""Partitions of a training split across clients, by Flower Datasets' partitioners.

flwr-datasets' partitioners run offline on any `datasets.Dataset` (its `FederatedDataset`
downloads from the Hugging Face hub and cannot run here), so kiln hands them a table of the
split's labels and row numbers and takes back each client's row numbers:
- iid: `IidPartitioner` (equal shuffled shares);
- dirichlet: `DirichletPartitioner(partition_by="label", alpha)` (Hsu et al. 2019, arXiv 1909.06335);
- pathological: `PathologicalPartitioner(num_classes_per_partition=k, class_assignment_mode="random")`
  (McMahan et al. 2017's shards: k labels per client);
- quantity: `DirichletPartitioner` over a column that is constant, so only the sizes follow
  Dir(alpha) and the labels stay IID (quantity skew).
Every partitioner is seeded from the run's seed: the same config gives the same partition.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError, first_line
from kiln.federated.config import PartitionConfig, Partitioner


def split_labels(ds) -> np.ndarray:
    """The class index of every sample of a split (ArrayDataset keeps them in `.y`)."""
    y = getattr(ds, "y", None)
    if y is None:
        y = torch.stack([torch.as_tensor(ds[i][1]) for i in range(len(ds))])
    y = np.asarray(torch.as_tensor(y))
    if y.ndim != 1:
        raise KilnError(f"federated partitions need one class label per sample; this dataset's targets have shape {y.shape}")
    return y.astype(np.int64)


def partition(labels: np.ndarray, clients: int, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Row numbers of each client's share of a split whose labels are `labels`."""
    import datasets   # heavy (pyarrow): only federated runs need it
    from flwr_datasets import partitioner as fp

    n = len(labels)
    if clients > n:
        raise KilnError(f"{clients} clients but the training split has only {n} samples")
    if cfg.kind in (Partitioner.DIRICHLET, Partitioner.QUANTITY) and clients * cfg.min_size > n:
        raise KilnError(f"partition.min_size {cfg.min_size} x {clients} clients exceeds the {n} training samples")
    if cfg.kind == Partitioner.PATHOLOGICAL and cfg.labels_per_client > len(np.unique(labels)):
        raise KilnError(f"partition.labels_per_client {cfg.labels_per_client} exceeds the "
                        f"{len(np.unique(labels))} labels of the dataset")
    table = datasets.Dataset.from_dict({"label": labels, "row": np.arange(n), "all": np.zeros(n, dtype=np.int64)})
    if cfg.kind == Partitioner.IID:
        part = fp.IidPartitioner(clients)
    elif cfg.kind == Partitioner.PATHOLOGICAL:
        part = fp.PathologicalPartitioner(clients, "label", cfg.labels_per_client, class_assignment_mode="random",
                                          seed=seed)
    else:
        by = "label" if cfg.kind == Partitioner.DIRICHLET else "all"
        part = fp.DirichletPartitioner(clients, by, cfg.alpha, min_partition_size=cfg.min_size, seed=seed)
    part.dataset = table
    with warnings.catch_warnings():   # its resampling notes and unused-class notes are not errors
        warnings.simplefilter("ignore")
        try:
            rows = [np.asarray(part.load_partition(i)["row"], dtype=np.int64) for i in range(clients)]
        except ValueError as exc:
            raise KilnError(f"partition {cfg.kind} of {n} samples across {clients} clients failed: {first_line(exc)}") from None
    if cfg.kind == Partitioner.IID:   # IidPartitioner cuts the table in order: shuffle first, seeded
        order = np.random.default_rng(seed).permutation(n)
        rows = [order[r] for r in rows]
    empty = [i for i, r in enumerate(rows) if len(r) == 0]
    if empty:
        raise KilnError(f"partition {cfg.kind} left client {empty[0]} with no samples "
                        f"({clients} clients, {n} samples): use fewer clients or another partition")
    return rows


def histograms(labels: np.ndarray, rows: list[np.ndarray], classes: int) -> list[list[int]]:
    """Each client's count of each label."""
    return [np.bincount(labels[r], minlength=classes).tolist() for r in rows]


def plot_histograms(hist: list[list[int]], path: Path, title: str) -> None:
    """One stacked bar per client, one colour per label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(hist)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(hist) + 2), 3.2))
    bottom = np.zeros(len(hist))
    cmap = plt.get_cmap("tab10" if counts.shape[1] <= 10 else "tab20")
    for c in range(counts.shape[1]):
        ax.bar(range(len(hist)), counts[:, c], bottom=bottom, color=cmap(c % cmap.N), label=str(c))
        bottom += counts[:, c]
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=9)
    ax.legend(title="label", fontsize=6, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

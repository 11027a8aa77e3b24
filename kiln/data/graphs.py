"""Zachary's karate club (34 members, 78 friendships) for node classification."""
from __future__ import annotations

import numpy as np
import torch

from kiln.data.base import DataSplits, register
from kiln.data.splits import (
    ArrayDataset, choice, int_labels, load_npz, missing_package, package_version,
    stratified_split, user_path,
)
from kiln.errors import KilnError

FRACTIONS = (0.5, 0.25, 0.25)   # 34 nodes: enough val/test nodes to measure anything
NPZ_FORMAT = "an .npz with edge_index (2,E) int, y (N,) int, and optionally x (N,F) float"


def _pyg_communities() -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    try:
        from torch_geometric.datasets import KarateClub
    except ImportError:
        raise missing_package("karate", "torch_geometric", "torch_geometric",
                              "use labels=club (networkx)") from None
    g = KarateClub()[0]
    return (g.x.numpy(), g.edge_index.numpy(), g.y.numpy(),
            f"torch_geometric {package_version('torch_geometric')} KarateClub(): 34 nodes, "
            "4 communities (modularity clustering), identity features")


def _networkx_club() -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    try:
        import networkx as nx
    except ImportError:
        raise missing_package("karate", "networkx", "networkx") from None
    g = nx.karate_club_graph()
    edges = np.asarray(list(g.edges()), dtype=np.int64).T
    edge_index = np.concatenate([edges, edges[::-1]], axis=1)   # both directions, as PyG stores it
    club = nx.get_node_attributes(g, "club")
    y = np.asarray([int(club[n] == "Officer") for n in sorted(g.nodes)], dtype=np.int64)
    return (np.eye(g.number_of_nodes(), dtype=np.float32), edge_index, y,
            f"networkx {package_version('networkx')} karate_club_graph(): 34 nodes, the club's real "
            "split (Mr. Hi = 0, Officer = 1), identity features")


def _user_graph(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    full = user_path("karate", path, NPZ_FORMAT)
    z = load_npz("karate", full, ("edge_index", "y"))
    y = int_labels("karate", z["y"], path)
    n = len(y)
    ei = np.asarray(z["edge_index"])
    x = np.asarray(z["x"], dtype=np.float32) if "x" in z else np.eye(n, dtype=np.float32)
    if ei.ndim != 2 or ei.shape[0] != 2 or not np.issubdtype(ei.dtype, np.integer) \
            or (ei.size and (ei.min() < 0 or ei.max() >= n)) or x.ndim != 2 or len(x) != n:
        raise KilnError(f"karate: {path} has edge_index {ei.shape} {ei.dtype}, x {x.shape}, y {y.shape}; "
                        f"expected {NPZ_FORMAT} with node ids in 0..N-1")
    return x, ei.astype(np.int64), y, f"{path}: a user graph with {n} nodes"


@register("karate", "node-classification",
          "Zachary's karate club: 34 nodes, 156 directed edges (78 friendships both ways), "
          "identity features. labels=community: PyG's 4 communities; labels=club: the real "
          "split of the club (2 classes). One sample per split: x = dict(x (34,34) float32, "
          "edge_index (2,156) int64), y = labels (34,) with -100 outside the split; the nodes "
          "are split stratified and seeded 50/25/25 (same seed, same split). path: an .npz "
          "with edge_index, y and optional x.",
          "torch_geometric KarateClub() / networkx karate_club_graph()",
          labels="community", path=None)
def karate(seed: int = 0, path: str | None = None, labels: str = "community") -> DataSplits:
    choice("karate", "labels", labels, ("community", "club"))
    if path is not None:
        x, edge_index, y, source = _user_graph(path)
    else:
        x, edge_index, y, source = _pyg_communities() if labels == "community" else _networkx_club()
    features = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    edges = torch.from_numpy(np.ascontiguousarray(edge_index, dtype=np.int64))
    y_all = torch.from_numpy(np.asarray(y, dtype=np.int64))
    splits, masks = [], {}
    for name, idx in zip(("train", "val", "test"), stratified_split(y, seed, FRACTIONS)):
        mask = torch.zeros(len(y_all), dtype=torch.bool)
        mask[torch.from_numpy(idx)] = True
        masks[name] = mask
        masked = torch.where(mask, y_all, torch.full_like(y_all, -100))
        splits.append(ArrayDataset({"x": features[None], "edge_index": edges[None]}, masked[None]))
    return DataSplits("karate", "node-classification", *splits, num_classes=int(y_all.max()) + 1,
                      sample_shape=None, source=source,
                      info={"num_nodes": len(y_all), "num_edges": edges.shape[1],
                            "num_features": features.shape[1], "labels": labels,
                            "masks": masks, "ignore_index": -100, "seed": seed,
                            "split_sizes": {k: int(m.sum()) for k, m in masks.items()}})

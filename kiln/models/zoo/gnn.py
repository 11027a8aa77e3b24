"""Graph neural networks (PyTorch Geometric layers) for node classification on karate club.

Both add the self-loops themselves and build their layers with add_self_loops=False. PyG's
own default first *removes* existing self-loops (a boolean mask over the edges), which gives
torch.export a data-dependent edge count that kiln's graph cannot size; appending one loop
per node is static. The two agree on graphs without self-loops, such as karate club.
Message passing is index_select/scatter_add, which holds no FLOPs in flop_counter's
convention, so a layer's FLOPs are those of its linear transform.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kiln.errors import KilnError
from kiln.models.loaded import LoadedModel
from kiln.models.zoo import register

# Zachary's karate club as PyG ships it: 34 members, one-hot features, 4 community classes
KARATE_NODES, KARATE_CLASSES = 34, 4


def _pyg():
    try:
        import torch_geometric.nn as pyg_nn
        from torch_geometric.utils import add_self_loops
    except ImportError:
        raise KilnError("the GNN zoo models need torch_geometric: pip install torch-geometric") from None
    return pyg_nn, add_self_loops


def with_self_loops(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    return _pyg()[1](edge_index, num_nodes=num_nodes)[0]


class GCN(nn.Module):
    """Two-layer GCN (Kipf & Welling 2017): H' = D^-1/2 (A + I) D^-1/2 H W."""

    def __init__(self, in_features: int = KARATE_NODES, hidden: int = 16, classes: int = KARATE_CLASSES,
                 dropout: float = 0.5):
        super().__init__()
        pyg_nn = _pyg()[0]
        self.conv1 = pyg_nn.GCNConv(in_features, hidden, add_self_loops=False)
        self.conv2 = pyg_nn.GCNConv(hidden, classes, add_self_loops=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Node features (N, F) and edges (2, E) -> node logits (N, classes)."""
        edge_index = with_self_loops(edge_index, x.shape[0])
        h = self.dropout(F.relu(self.conv1(self.dropout(x), edge_index)))
        return self.conv2(h, edge_index)


class GAT(nn.Module):
    """Two-layer GAT (Velickovic et al. 2018): multi-head attention over each node's neighbours,
    heads concatenated in the hidden layer, one head at the output; ELU between."""

    def __init__(self, in_features: int = KARATE_NODES, hidden: int = 8, heads: int = 4,
                 classes: int = KARATE_CLASSES, dropout: float = 0.5):
        super().__init__()
        pyg_nn = _pyg()[0]
        self.conv1 = pyg_nn.GATConv(in_features, hidden, heads=heads, dropout=dropout, add_self_loops=False)
        self.conv2 = pyg_nn.GATConv(hidden * heads, classes, heads=1, dropout=dropout, add_self_loops=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        edge_index = with_self_loops(edge_index, x.shape[0])
        h = self.dropout(F.elu(self.conv1(self.dropout(x), edge_index)))
        return self.conv2(h, edge_index)


def karate_inputs() -> dict[str, torch.Tensor]:
    """The real karate-club graph (Zachary 1977) from PyG's in-memory KarateClub: identity
    features and both directions of its 78 friendships."""
    from torch_geometric.datasets import KarateClub

    data = KarateClub()[0]
    return {"x": data.x, "edge_index": data.edge_index}


@register("gcn", params=628, family="gnn", task="node-classification", dataset="karate",
          default_input="x 34x34 float32, edge_index 2x156 int64",
          description="two-layer GCN (Kipf & Welling 2017), PyG GCNConv, hidden 16")
def gcn() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("zoo:gcn", GCN().eval(), (), karate_inputs())


@register("gat", params=1_324, family="gnn", task="node-classification", dataset="karate",
          default_input="x 34x34 float32, edge_index 2x156 int64",
          description="two-layer GAT (Velickovic et al. 2018), PyG GATConv, 4 heads x 8")
def gat() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("zoo:gat", GAT().eval(), (), karate_inputs())

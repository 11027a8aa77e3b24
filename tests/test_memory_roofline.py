"""Peak activation memory and roofline latency against hand-computed answers."""
import pytest
import torch
from torch import nn

from kiln.analysis.cost import AnnotateCost
from kiln.analysis.memory import peak_activation
from kiln.analysis.roofline import Bound, node_roofline, roofline
from kiln.errors import KilnError
from kiln.graph.capture import capture
from kiln.graph.node import Cost
from kiln.hardware.profiles import HardwareProfile
from kiln.models.loaded import LoadedModel


def graph_of(model, *args):
    graph = capture(LoadedModel("t", model.eval(), args))
    AnnotateCost()(graph)
    return graph


def test_peak_activation_of_a_chain_by_hand():
    # input 4x10 (160 B) -> linear 4x20 (320 B) -> relu 4x20 (320 B) -> linear 4x5 (80 B)
    # during relu the linear output and the relu output are both alive: 640 B
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    mem = peak_activation(graph_of(model, torch.randn(4, 10)))
    assert mem.peak_activation_bytes == 640
    assert mem.input_bytes == 160 and mem.output_bytes == 80


class Residual(nn.Module):
    def forward(self, x):
        y = torch.relu(x)          # x must stay alive for the add
        z = y.view(-1) * 2         # a view aliases y's storage: no new allocation
        return x + z.view_as(x)


def test_peak_activation_keeps_residual_inputs_alive_and_views_free():
    # x (400 B) + relu (400 B) + mul (400 B) alive together at the mul; the add then frees y
    mem = peak_activation(graph_of(Residual(), torch.randn(10, 10)))
    assert mem.peak_activation_bytes == 3 * 400


HW = HardwareProfile("toy", "toy", "accelerator", {"fp32": 100.0, "int8": 400.0}, 10.0)


def test_node_roofline_is_the_slower_of_compute_and_memory():
    assert node_roofline(Cost(1000, 20, 30), "float32", HW).latency_s == pytest.approx(10.0)  # 1000/100 vs 50/10
    r = node_roofline(Cost(100, 200, 0), "float32", HW)
    assert r.latency_s == pytest.approx(20.0) and r.bound is Bound.MEMORY
    assert node_roofline(Cost(1000, 20, 30), "int8", HW).latency_s == pytest.approx(5.0)
    assert node_roofline(Cost(0, 0, 0), "float32", HW).bound is Bound.NONE


def test_model_roofline_is_the_sum_over_nodes_and_ridge_decides_the_bound():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    graph = graph_of(model, torch.randn(256, 64))
    per_node, total = roofline(graph, HW)
    linear = next(n for n in graph.ops if n.op == "linear")
    relu = next(n for n in graph.ops if n.op == "relu")
    # linear: 2*256*64*64 FLOPs; reads x, W, b; writes y
    assert linear.cost.flops == 2 * 256 * 64 * 64
    assert linear.cost.bytes == 4 * (256 * 64 + 64 * 64 + 64 + 256 * 64)
    assert per_node[linear.name].latency_s == pytest.approx(max(2 * 256 * 64 * 64 / 100, linear.cost.bytes / 10))
    assert per_node[relu.name].bound is Bound.MEMORY and relu.cost.flops == 0
    assert total.latency_s == pytest.approx(sum(r.latency_s for r in per_node.values()))
    assert linear.cost.intensity > HW.ridge() and per_node[linear.name].bound is Bound.COMPUTE


def test_profile_validates_itself():
    with pytest.raises(KilnError, match="kind"):
        HardwareProfile("x", "", "quantum", {"fp32": 1.0}, 1.0)
    with pytest.raises(KilnError, match="fallback"):
        HardwareProfile("x", "", "cpu", {"int8": 1.0}, 1.0)
    with pytest.raises(KilnError, match="bandwidth"):
        HardwareProfile("x", "", "cpu", {"fp32": 1.0}, 0.0)


def test_embedding_reads_only_the_rows_it_gathers():
    emb = nn.Embedding(10000, 16)
    graph = graph_of(emb, torch.tensor([[1, 2, 3]]))
    node = next(n for n in graph.ops if n.op == "embedding")
    assert node.cost.bytes_written == 3 * 16 * 4
    assert node.cost.bytes_read == 3 * 16 * 4 + 3 * 8   # rows + int64 indices, not the 640 kB table

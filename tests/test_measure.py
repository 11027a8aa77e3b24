"""The measured profile: torch.profiler time attributed to each graph node."""
import torch
from torch import nn

from kiln.analysis.measure import measure
from kiln.graph.capture import capture
from kiln.models.loaded import LoadedModel


class BigAndSmall(nn.Module):
    def forward(self, a, b):
        return (a @ b)[0] + 1.0   # a 768^3 matmul next to an add of one row


def test_every_op_is_measured_and_time_lands_on_the_right_node():
    loaded = LoadedModel("t", BigAndSmall(), (torch.randn(768, 768), torch.randn(768, 768)))
    graph = capture(loaded)
    record = measure(graph, loaded, repeats=3, warmup=1)
    assert set(record.per_node_s) == {n.name for n in graph.ops}
    matmul = next(n.name for n in graph.ops if n.op == "matmul")
    add = next(n.name for n in graph.ops if n.op == "add")
    # 906 MFLOP against a 768-element add: the matmul must own the time (oracle: the work itself)
    assert record.per_node_s[matmul] > 3 * record.per_node_s[add]
    assert record.ops_s == sum(record.per_node_s.values())
    assert record.eager_s > 0 and record.repeats == 3

"""Capture into kiln's graph: typed node metadata, equivalence with eager, clear failures."""
import pytest
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.graph.capture import capture
from kiln.graph.node import NodeKind
from kiln.graph.passes import PassError, PassManager, PassResult
from kiln.models.loaded import LoadedModel
from kiln.models.spec import load


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(torch.relu(self.fc(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(Block(), Block().fc.__class__(4, 2))

    def forward(self, x):
        return self.body(x)


def test_node_metadata_names_module_shape_dtype_and_params():
    model = Net().eval()
    graph = capture(LoadedModel("t", model, (torch.randn(3, 8),)))
    linears = [n for n in graph.ops if n.op == "linear"]
    assert [n.module for n in linears] == ["body.0.fc", "body.1"]
    assert [n.module_type for n in linears] == ["Linear", "Linear"]
    assert linears[0].shape == (3, 4) and linears[0].dtype == "float32"
    assert linears[0].params == ("body.0.fc.weight", "body.0.fc.bias")
    norm = next(n for n in graph.ops if n.op == "layer_norm")
    assert norm.module == "body.0.norm" and norm.params == ("body.0.norm.weight", "body.0.norm.bias")
    kinds = {n.kind for n in graph.nodes}
    assert {NodeKind.INPUT, NodeKind.PARAM, NodeKind.OP, NodeKind.OUTPUT} <= kinds


@pytest.mark.parametrize("spec", ["zoo:mlp", "zoo:resnet20", "zoo:minilm"])
def test_captured_graph_runs_like_eager(spec):
    loaded = load(spec)
    graph = capture(loaded)
    expected = loaded.run()
    got = graph.module()(*loaded.example_inputs, **loaded.example_kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # every op carries the module it came from (the root module's FQN is "", its type is set)
    assert all(n.module_type for n in graph.ops)


def test_dynamic_batch_capture_runs_other_batch_sizes():
    loaded = load("zoo:resnet20")
    graph = capture(loaded, dynamic_batch=True)
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(graph.module()(x), loaded.model(x), rtol=1e-4, atol=1e-5)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:   # control flow on a tensor's value: torch.export cannot capture it
            return x * 2
        return x


def test_capture_failure_names_the_construct():
    with pytest.raises(KilnError) as err:
        capture(LoadedModel("py:mine.py:f", DataDependent(), (torch.randn(3),)))
    message = str(err.value)
    assert "\n" not in message
    assert "cannot capture py:mine.py:f" in message
    assert "if x.sum() > 0" in message   # the user's own line, not a torch frame


@pytest.mark.parametrize("verbose", [False, True])
def test_a_failed_capture_keeps_torch_s_graph_dump_for_verbose(capsys, verbose):
    import logging

    kiln_log = logging.getLogger("kiln")
    level = kiln_log.level
    kiln_log.setLevel(logging.DEBUG if verbose else logging.NOTSET)
    try:
        with pytest.raises(KilnError):
            capture(LoadedModel("py:mine.py:f", DataDependent(), (torch.randn(3),)))
    finally:
        kiln_log.setLevel(level)
    err = capsys.readouterr().err
    # torch prints the partially traced graph (its `def forward(`) before raising
    assert ("def forward(" in err) is verbose


def test_capture_of_200_layer_mlp():
    model = nn.Sequential(*[m for _ in range(200) for m in (nn.Linear(64, 64), nn.ReLU())])
    graph = capture(LoadedModel("t", model, (torch.randn(2, 64),)))
    assert sum(n.op == "linear" for n in graph.ops) == 200
    assert graph.ops[-1].module == "399"


def test_pass_manager_runs_passes_in_order_and_names_a_failing_pass():
    graph = capture(load("zoo:mlp"))
    seen = []

    class Mark:
        def __init__(self, name):
            self.name = name

        def __call__(self, g):
            seen.append(self.name)
            return PassResult(g, False, len(g.ops))

    result = PassManager([Mark("a"), Mark("b")]).run(graph)
    assert seen == ["a", "b"] and not result.modified
    assert result.record == [("a", len(graph.ops)), ("b", len(graph.ops))]

    def bad_verify(g):
        raise AssertionError("outputs differ")

    with pytest.raises(PassError, match="after pass a"):
        PassManager([Mark("a")], verify=bad_verify).run(graph)

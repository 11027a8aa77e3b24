"""kiln's FLOP count against torch.utils.flop_counter, op by op and model by model."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kiln.analysis.cost import AnnotateCost
from kiln.analysis.flops import sdpa_custom_mapping
from kiln.graph.capture import capture
from kiln.models.loaded import LoadedModel
from kiln.models.spec import load


def oracle(model, args=(), kwargs=None) -> int:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=sdpa_custom_mapping()) as counter:
        model(*args, **(kwargs or {}))
    return counter.get_total_flops()


def kiln_flops(model, args=(), kwargs=None) -> int:
    graph = capture(LoadedModel("test", model, tuple(args), dict(kwargs or {})))
    return AnnotateCost()(graph).record.flops


class Fn(nn.Module):
    def __init__(self, fn, *params):
        super().__init__()
        self.fn = fn
        self.ps = nn.ParameterList([nn.Parameter(p) for p in params])

    def forward(self, *xs):
        return self.fn(*xs, *self.ps)


r = torch.randn
CASES = {
    "linear": (nn.Linear(16, 8), (r(4, 16),)),
    "linear3d": (nn.Linear(16, 8, bias=False), (r(2, 5, 16),)),
    "matmul_bcast": (Fn(lambda a, b: a @ b), (r(3, 4, 5), r(5, 6))),
    "bmm": (Fn(torch.bmm), (r(3, 4, 5), r(3, 5, 2))),
    "addmm": (Fn(lambda c, a, b: torch.addmm(c, a, b)), (r(6), r(4, 5), r(5, 6))),
    "baddbmm": (Fn(lambda c, a, b: torch.baddbmm(c, a, b)), (r(3, 4, 6), r(3, 4, 5), r(3, 5, 6))),
    "einsum": (Fn(lambda a, b: torch.einsum("bhqd,bhkd->bhqk", a, b)), (r(2, 3, 4, 8), r(2, 3, 5, 8))),
    "conv1d": (nn.Conv1d(3, 8, 3, padding=1), (r(2, 3, 20),)),
    "conv2d_grouped_strided": (nn.Conv2d(8, 16, 3, stride=2, groups=4), (r(2, 8, 15, 15),)),
    "conv2d_depthwise": (nn.Conv2d(8, 8, 3, groups=8, padding=1), (r(1, 8, 9, 9),)),
    "conv3d": (nn.Conv3d(2, 4, (3, 3, 3), padding=1), (r(1, 2, 4, 8, 8),)),
    "conv_transpose2d": (nn.ConvTranspose2d(4, 6, 3, stride=2), (r(2, 4, 7, 7),)),
    "conv_transpose1d_groups": (nn.ConvTranspose1d(4, 6, 3, groups=2), (r(2, 4, 7),)),
    "sdpa": (Fn(lambda q, k, v: nn.functional.scaled_dot_product_attention(q, k, v)), (r(2, 4, 10, 8), r(2, 4, 12, 8), r(2, 4, 12, 16))),
    "sdpa_causal": (Fn(lambda q, k, v: nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)), (r(1, 2, 6, 8),) * 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_flops_equal_flop_counter(case):
    model, args = CASES[case]
    expected = oracle(model.eval(), args)
    assert expected > 0
    assert kiln_flops(model, args) == expected


def test_matrix_vector_counts_where_flop_counter_is_blind():
    # flop_counter has no formula for aten.mv and counts 0; a mat-vec is 2*m*k FLOPs
    model, args = Fn(lambda a, b: a @ b), (r(7, 5), r(5))
    assert oracle(model, args) == 0
    assert kiln_flops(model, args) == 2 * 7 * 5


def test_sdpa_formula_by_hand():
    # Q K^T: 2*B*H*Sq*Sk*D, then P V: 2*B*H*Sq*Sk*Dv
    model, args = CASES["sdpa"]
    assert kiln_flops(model, args) == 2 * 2 * 4 * 10 * 12 * 8 + 2 * 2 * 4 * 10 * 12 * 16


def test_elementwise_ops_have_no_flops():
    model = Fn(lambda x: torch.relu(x).softmax(-1) * 2 + x.mean())
    assert kiln_flops(model, (r(4, 4),)) == 0 == oracle(model, (r(4, 4),))


@pytest.mark.parametrize("spec", ["zoo:mlp", "zoo:resnet20", "zoo:minilm"])
def test_zoo_flops_equal_flop_counter(spec):
    loaded = load(spec)
    expected = oracle(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    got = kiln_flops(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    assert abs(got - expected) <= 0.01 * expected
    assert got == expected


def test_oracle_blind_spot_is_real_and_kiln_counts_attention():
    """flop_counter alone drops the CPU fused attention; kiln must not."""
    loaded = load("zoo:minilm")
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        loaded.run()
    counted = kiln_flops(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    assert plain.get_total_flops() < counted
    # 6 layers, 12 heads, 128 tokens, head dim 32: QK^T and PV
    attention = 6 * (2 * 12 * 128 * 128 * 32 * 2)
    assert counted - plain.get_total_flops() == attention


class AutocastRegion(nn.Module):
    def forward(self, x):
        with torch.autocast("cpu", enabled=False):   # export wraps this region in a subgraph
            return x @ x


def test_flops_inside_an_autocast_region_are_counted():
    x = r(8, 8)
    assert kiln_flops(AutocastRegion(), (x,)) == 2 * 8 * 8 * 8 == oracle(AutocastRegion(), (x,))


# torch.cond between a wide and a narrow path (the branches differ in FLOPs), as a user's
# py: factory: dynamo, which traces the branches, skips functions of pytest-rewritten modules
BRANCHY = """
import torch
from torch import nn


class Branchy(nn.Module):
    def __init__(self, nested, use_cond):
        super().__init__()
        self.wide, self.narrow, self.head = nn.Linear(8, 64), nn.Linear(8, 64), nn.Linear(64, 4)
        self.nested, self.use_cond = nested, use_cond

    def forward(self, x):
        def wide(x):
            h = self.wide(x).relu()
            if self.nested:   # a cond inside a branch
                h = torch.cond(h.sum() > 0, lambda h: h @ torch.ones(64, 64), lambda h: h.clone(), (h,))
            return h @ torch.ones(64, 64)

        if not self.use_cond:   # the same model with Python's `if`: eager runs one branch
            return self.head(wide(x) if x.sum() > 0 else self.narrow(x))
        return self.head(torch.cond(x.sum() > 0, wide, lambda x: self.narrow(x), (x,)))


def make(sign=1.0, nested=False, use_cond=True):
    return Branchy(nested, use_cond), (sign * torch.rand(2, 8),)   # the input's sign picks the branch
"""


def _branchy(tmp_path, factory: str):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "branchy.py").write_text(BRANCHY + f"\n\ndef f():\n    return {factory}\n")
    return load(f"py:{tmp_path / 'branchy.py'}:f")


def test_cond_counts_the_branch_the_example_input_takes_like_flop_counter(tmp_path):
    """The oracle is flop_counter on the same model with Python's `if` in place of torch.cond:
    under FlopCounterMode an eager torch.cond runs neither branch alone (torch 2.13: its
    counts and output match no branch, and dynamo refuses to trace torch.cond afterwards)."""
    for sign in (1.0, -1.0):
        record = AnnotateCost()(capture(_branchy(tmp_path / str(sign), f"make({sign})"))).record
        plain = _branchy(tmp_path / f"plain{sign}", f"make({sign}, use_cond=False)")
        with FlopCounterMode(display=False) as counter:
            plain.model(*plain.example_inputs)
        assert record.flops == counter.get_total_flops() > 0
        assert record.uncounted_ops == ()
        assert record.branches == (f"cond: the {'true' if sign > 0 else 'false'} branch, taken by the example input",)


def test_a_higher_order_op_that_cannot_be_counted_is_listed_never_free(tmp_path):
    record = AnnotateCost()(capture(_branchy(tmp_path, "make(1.0, nested=True)"))).record
    assert "cond" in record.uncounted_ops   # a cond inside a branch: its branch is unknown


def test_analyze_reports_the_cond_branch_in_its_json_and_one_printed_line(tmp_path):
    """The known answer: a positive example input takes the true branch, a negative the false."""
    import json

    from typer.testing import CliRunner

    from kiln.cli.main import app

    for sign, branch in ((1.0, "true"), (-1.0, "false")):
        spec = _branchy(tmp_path / str(sign), f"make({sign})").spec
        out = tmp_path / f"{sign}.json"
        result = CliRunner().invoke(app, ["analyze", spec, "--hardware", "h100", "--no-measure", "--json", str(out)])
        assert result.exit_code == 0, result.output
        expected = f"cond: the {branch} branch, taken by the example input"
        assert json.loads(out.read_text())["cond_branches"] == [expected]
        printed = " ".join(result.output.split())     # the summary table may wrap the line
        assert printed.count("torch.cond") == 1
        assert f"torch.cond {expected} (FLOPs counted for that branch only)" in printed
    plain = tmp_path / "mlp.json"
    assert CliRunner().invoke(app, ["analyze", "zoo:mlp", "--hardware", "h100", "--no-measure",
                                    "--json", str(plain)]).exit_code == 0
    assert json.loads(plain.read_text())["cond_branches"] == []

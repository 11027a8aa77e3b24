"""Structured pruning: groups from the graph, shrinking, importance, restore; oracles are eager
outputs, exact parameter arithmetic and hand-computed scores."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.prune.criteria import CRITERIA, Reduction, ScoreContext
from kiln.prune.deps import Group
from kiln.prune.importance import group_scores
from kiln.prune.structured import dependency_groups, prune_structured, prune_transformer, restore

torch.set_num_threads(1)


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class Net(nn.Module):
    """Stem, a residual block, a depthwise-separable branch and a cat, then a linear head."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.block = Block(c)
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.pw = nn.Conv2d(2 * c, c, 1)
        self.side = nn.Conv2d(c, 4, 1)
        self.fc = nn.Linear((c + 4) * 4, 10)

    def forward(self, x):
        x = self.block(torch.relu(self.bn(self.stem(x))))
        y = self.pw(torch.relu(self.dw(self.expand(x))))
        z = torch.cat([y, self.side(x)], dim=1)
        return self.fc(nn.functional.adaptive_avg_pool2d(z, 2).flatten(1))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    for m in net.modules():   # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net


X = (torch.randn(2, 3, 8, 8),)


def _by_producer(groups: list[Group]) -> dict[str, Group]:
    return {g.producers[0]: g for g in groups if g.producers}


def _members(g: Group) -> set[tuple[str, int, int]]:
    return {(s.param, s.dim, s.offset) for s in g.slots}


def test_coupled_groups_found_exactly():
    groups = _by_producer(dependency_groups(_net(), X))
    residual = groups["block.conv2"]
    assert residual.producers == ["block.conv2", "stem"]
    assert _members(residual) == {
        ("stem.weight", 0, 0), ("bn.weight", 0, 0), ("bn.bias", 0, 0), ("bn.running_mean", 0, 0), ("bn.running_var", 0, 0),
        ("block.conv1.weight", 1, 0), ("block.conv2.weight", 0, 0), ("block.bn2.weight", 0, 0), ("block.bn2.bias", 0, 0),
        ("block.bn2.running_mean", 0, 0), ("block.bn2.running_var", 0, 0), ("expand.weight", 1, 0), ("side.weight", 1, 0)}
    # depthwise: the expand conv's channels are the depthwise conv's channels, read by pw
    assert _members(groups["expand"]) == {("expand.weight", 0, 0), ("expand.bias", 0, 0), ("dw.weight", 0, 0),
                                          ("dw.bias", 0, 0), ("pw.weight", 1, 0)}
    # cat: pw's channels sit at fc features 0.., side's at 8*4.., 4 features (2x2 pool) per channel
    pw, side = groups["pw"], groups["side"]
    assert [(s.offset, s.ppc) for s in pw.slots if s.param == "fc.weight"] == [(0, 4)]
    assert [(s.offset, s.ppc) for s in side.slots if s.param == "fc.weight"] == [(32, 4)]
    assert groups["fc"].pinned == ["it reaches the model's output"]
    assert not any(g.pinned for name, g in groups.items() if name != "fc")


def _zero_units(model: nn.Module, group: Group, units: torch.Tensor) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for slot in group.slots:
            if slot.param in params:
                params[slot.param].index_fill_(slot.dim, group.positions(slot, units), 0.0)


def test_pruning_zero_channels_keeps_outputs_and_exports():
    net = _net()
    for g in dependency_groups(net, X):
        if not g.pinned:
            _zero_units(net, g, torch.arange(0, g.units, 2))   # half of every group is exactly zero
    res = prune_structured(net, X, 0.5)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), net(x), atol=1e-5, rtol=1e-5)
        exported = torch.export.export(res.model, (x,), strict=False).module()
        torch.testing.assert_close(exported(x), res.model(x), atol=1e-6, rtol=1e-6)
    assert res.model.block.conv1.in_channels == 4 and res.model.dw.groups == 8 and res.model.fc.in_features == 24


def test_param_count_is_exact_arithmetic():
    res = prune_structured(_net(), X, 0.5)
    c, e, s = 4, 8, 2   # kept: residual/stem channels, expand/dw channels, side channels
    expected = (3 * c * 9 + 2 * c) + 2 * (c * c * 9 + 2 * c) + (e * c + e) + (e * 9 + e) + (c * e + c) \
        + (s * c + s) + ((c + s) * 4 * 10 + 10)
    assert res.report["params_after"] == sum(p.numel() for p in res.model.parameters()) == expected
    assert res.report["params_before"] == sum(p.numel() for p in _net().parameters())
    assert res.report["layers"]["block.conv1"]["in"] == [8, 4]


def test_restore_rebuilds_the_pruned_model():
    res = prune_structured(_net(), X, 0.5, "magnitude", Reduction.L2, round_to=2)
    fresh = restore(Net().eval(), res.record)
    fresh.load_state_dict(res.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(*X), res.model(*X))


def test_magnitude_sum_is_l1_norm_l2_is_l2_norm_and_snip_sum_is_taylor():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    (group,) = [g for g in dependency_groups(mlp, (x,)) if not g.pinned]
    w1, b1, w2 = mlp[0].weight, mlp[0].bias, mlp[2].weight
    params = dict(mlp.named_parameters())

    def mean_normalised(parts):
        return (sum(p / p.mean() for p in parts) / 3).detach()

    l1 = [w1.abs().sum(1), b1.abs(), w2.abs().sum(0)]
    torch.testing.assert_close(group_scores(group, "magnitude", params), mean_normalised(l1))
    l2 = [w1.pow(2).sum(1).sqrt(), b1.abs(), w2.pow(2).sum(0).sqrt()]
    torch.testing.assert_close(group_scores(group, "magnitude", params, reduction=Reduction.L2), mean_normalised(l2))
    nn.functional.cross_entropy(mlp(x), y).backward()
    taylor = [(w1 * w1.grad).abs().sum(1), (b1 * b1.grad).abs(), (w2 * w2.grad).abs().sum(0)]
    ctx = ScoreContext(grads={n: p.grad for n, p in mlp.named_parameters()})
    torch.testing.assert_close(group_scores(group, "snip", params, ctx), mean_normalised(taylor))
    mlp.zero_grad()
    res = prune_structured(mlp, (x,), 0.5, "snip", batches=[(x, y)])
    assert res.model[0].out_features == 3 and res.model[2].in_features == 3


@pytest.mark.parametrize("criterion", CRITERIA.names())
def test_every_criterion_prunes_structured_to_the_ratio_and_the_model_runs(criterion):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    res = prune_structured(mlp, (x,), 0.5, criterion, batches=[(x, y)])
    assert res.model[0].out_features == 4 and res.model[2].in_features == 4
    kept_rows = [i for i in range(8) if any(torch.equal(mlp[0].weight[i], r) for r in res.model[0].weight)]
    with torch.no_grad():   # oracle: the dense model with the dropped units' outputs zeroed
        h = torch.relu(mlp[0](x))[:, kept_rows]
        torch.testing.assert_close(res.model(x), h @ mlp[2].weight[:, kept_rows].T + mlp[2].bias)


class Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(torch.cumsum(self.conv1(x), dim=1))


def test_bad_input_is_a_kiln_error():
    with pytest.raises(KilnError, match=r"cannot prune conv1: no rule for cumsum in conv1|cannot prune conv1.*cumsum"):
        prune_structured(Cumsum(), X, 0.0, targets={"conv1": 0.5})
    with pytest.raises(KilnError, match="target 'nope' matches no layer"):
        prune_structured(_net(), X, 0.5, targets={"nope": 0.5})
    for ratio in (1.0, -0.1):
        with pytest.raises(KilnError, match="ratio must be in"):
            prune_structured(_net(), X, ratio)
    with pytest.raises(KilnError, match="criterion snip needs batches"):
        prune_structured(_net(), X, 0.5, "snip")
    with pytest.raises(KilnError, match="unknown pruning criterion 'l3'"):
        prune_structured(_net(), X, 0.5, "l3")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])   # one fused op, or matmul-softmax-matmul
def test_bert_heads_and_ffn_zero_units_keep_outputs(attention):
    from kiln.models.spec import load

    loaded = load("hf-config:bert")
    model, kw = loaded.model.eval(), loaded.example_kwargs
    model.set_attn_implementation(attention)
    groups = dependency_groups(model, (), kw)
    heads = [g for g in groups if "heads" in g.flags]
    assert len(heads) == 2 and all(g.units == 4 and g.unit == 16 for g in heads)
    assert {s.param.rsplit(".", 1)[0] for s in heads[0].slots} == {
        f"encoder.layer.0.attention.{m}" for m in ("self.query", "self.key", "self.value", "output.dense")}
    ffn = [g for g in groups if g.producers and g.producers[0].endswith("intermediate.dense")]
    for g in heads:
        _zero_units(model, g, torch.tensor([1, 3]))
    for g in ffn:
        _zero_units(model, g, torch.arange(0, g.units, 2))
    res = prune_transformer(model, (), heads=0.5, ffn=0.5, example_kwargs=kw)
    attn = res.model.encoder.layer[0].attention.self
    assert (attn.num_attention_heads, attn.all_head_size, attn.query.out_features) == (2, 32, 32)
    assert res.model.encoder.layer[1].intermediate.dense.out_features == 64
    with torch.no_grad():
        torch.testing.assert_close(res.model(**kw).last_hidden_state, model(**kw).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_pruned_resnet_saves_and_reloads_as_an_artifact(tmp_path):
    from kiln.runs.artifact import load_artifact, save_artifact
    from kiln.runs.transforms import TransformRecord
    from kiln.models.spec import load

    loaded = load("zoo:resnet20")
    res = prune_structured(loaded.model, loaded.example_inputs, 0.5, ignore=("fc",))
    save_artifact(tmp_path / "a", res.model, spec="zoo:resnet20", dataset="", transforms=[TransformRecord.from_flat(res.record)])
    back = load_artifact(tmp_path / "a").model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), res.model.eval()(x))
    assert sum(p.numel() for p in back.parameters()) == res.report["params_after"]


class FixedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8 * 64, 2)

    def forward(self, x):
        return self.fc(self.conv(x).view(x.shape[0], 8 * 64))


def test_a_width_fixed_in_code_leaves_that_group_whole_or_is_an_error_when_targeted():
    res = prune_structured(FixedView(), X, 0.5)
    assert res.model.conv.out_channels == 8 and res.report["params_after"] == res.report["params_before"]
    assert "pruning it breaks the model's code: RuntimeError" in res.report["pinned"][-1]["reason"]
    with pytest.raises(KilnError, match="cannot prune conv: the pruned model no longer runs"):
        prune_structured(FixedView(), X, 0.5, targets={"conv": 0.5})


def test_layer_norm_without_affine_is_pinned():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8, elementwise_affine=False), nn.Linear(8, 2))
    (group,) = [g for g in dependency_groups(model, (torch.randn(2, 4),)) if g.producers == ["0"]]
    assert "layer_norm in 1" in group.pinned[0] and "without affine" in group.pinned[0]


class Mixed(nn.Module):
    """Conv1d/BatchNorm1d/Conv3d channels and an embedding -> layer norm -> linear width."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv1d(2, 6, 3, padding=1), nn.BatchNorm1d(6), nn.Conv1d(6, 3, 1)
        self.v1, self.v2 = nn.Conv3d(1, 4, 1), nn.Conv3d(4, 2, 1)
        self.emb, self.ln, self.fc = nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x, vol, ids):
        a = self.c2(torch.relu(self.bn(self.c1(x)))).mean(-1)
        b = self.v2(torch.relu(self.v1(vol))).mean((2, 3, 4))
        return a + self.fc(self.ln(self.emb(ids))).mean(1), b


def test_conv1d_conv3d_embedding_layer_norm_shrink_consistently():
    torch.manual_seed(0)
    model = Mixed().eval()
    inputs = (torch.randn(2, 2, 5), torch.randn(2, 1, 2, 2, 2), torch.randint(0, 10, (2, 4)))
    groups = _by_producer(dependency_groups(model, inputs))
    assert set(groups) >= {"c1", "v1", "emb"} and not groups["emb"].pinned
    for name in ("c1", "v1"):
        _zero_units(model, groups[name], torch.arange(0, groups[name].units, 2))
    res = prune_structured(model, inputs, 0.5)
    m = res.model
    assert (m.c1.out_channels, m.bn.num_features, m.c2.in_channels, m.v2.in_channels) == (3, 3, 3, 2)
    assert (m.emb.embedding_dim, m.ln.normalized_shape, m.fc.in_features) == (4, (4,), 4)
    with torch.no_grad():
        # the embedding width changes what the layer norm averages: only the conv outputs are exact
        torch.testing.assert_close(m(*inputs)[1], model(*inputs)[1], atol=1e-5, rtol=1e-5)
        exported = torch.export.export(m, inputs, strict=False).module()
        torch.testing.assert_close(exported(*inputs), m(*inputs))


@pytest.mark.parametrize("spec", ["hf-config:gpt2", "hf-config:llama"])   # Conv1D (addmm); SwiGLU gate * up
def test_decoder_ffn_zero_units_keep_outputs(spec):
    from kiln.models.spec import load

    loaded = load(spec)
    model, kw = loaded.model.eval(), loaded.example_kwargs
    ffn = [g for g in dependency_groups(model, (), kw) if g.producers and "mlp" in g.producers[0]]
    assert len(ffn) == 2 and all(g.units == 128 and not g.pinned for g in ffn)
    for g in ffn:
        _zero_units(model, g, torch.arange(0, g.units, 2))
    res = prune_transformer(model, (), ffn=0.5, example_kwargs=kw)
    removed = res.report["params_before"] - res.report["params_after"]
    assert removed == sum(_slot_numel(model, g) // 2 for g in ffn)   # half of each member's share
    with torch.no_grad():
        torch.testing.assert_close(res.model(**kw).last_hidden_state, model(**kw).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def _slot_numel(model: nn.Module, group: Group) -> int:
    """Parameters a group's members hold along its dimension (every unit's share, all units)."""
    params = dict(model.named_parameters())
    return sum(params[s.param].numel() for s in group.slots if s.param in params)

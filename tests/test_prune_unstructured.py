"""Unstructured pruning: exact zero counts, the right weights pruned, masks that survive
training and reload, permanent masks that export."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kiln.errors import KilnError
from kiln.prune.criteria import ScoreContext
from kiln.prune.unstructured import (ActivationSparsity, gradients, make_permanent, mask_of,
                                     prune_count, prune_unstructured, sparsify_activations)


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.conv, self.fc2 = nn.Linear(12, 20), nn.Conv1d(1, 3, 3), nn.Linear(54, 5)

    def forward(self, x):
        h = torch.relu(self.fc1(x)).unsqueeze(1)
        return self.fc2(self.conv(h).flatten(1))


def weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d))}


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
def test_local_magnitude_prunes_exactly_the_smallest_of_each_layer(ratio):
    model = Net()
    before = weights(model)
    result = prune_unstructured(model, ratio, "magnitude", "local")
    for row in result.report:
        w = before[row["module"]].reshape(-1)
        k = round(ratio * w.numel())
        assert row["zeros"] == k and row["total"] == w.numel()
        pruned = model.get_submodule(row["module"]).weight.reshape(-1) == 0
        assert torch.equal(pruned.nonzero().flatten().sort().values,
                           w.abs().argsort(stable=True)[:k].sort().values)


def test_global_magnitude_counts_over_all_layers_with_one_threshold():
    model = Net()
    before = weights(model)
    result = prune_unstructured(model, 0.8, "magnitude", "global")
    total = sum(w.numel() for w in before.values())
    assert sum(r["zeros"] for r in result.report) == prune_count(0.8, total) == round(0.8 * total)
    kept = torch.cat([before[n][model.get_submodule(n).weight != 0].abs() for n in before])
    gone = torch.cat([before[n][model.get_submodule(n).weight == 0].abs() for n in before])
    assert gone.max() <= kept.min()
    # layers end with different sparsities: it is one pool, not per layer
    assert len({r["zeros"] / r["total"] for r in result.report}) > 1


def test_random_is_seeded_and_exact():
    a = prune_unstructured(Net(), 0.5, "random", "local", ctx=ScoreContext(seed=1))
    b = prune_unstructured(Net(), 0.5, "random", "local", ctx=ScoreContext(seed=1))
    c = prune_unstructured(Net(), 0.5, "random", "local", ctx=ScoreContext(seed=2))
    wa, wb, wc = (weights(r.model) for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert [r["zeros"] for r in a.report] == [round(0.5 * r["total"]) for r in a.report]


def test_snip_scores_are_weight_times_gradient():
    model, ref = Net(), Net()
    x, y = torch.randn(6, 12), torch.tensor([0, 1, 2, 3, 4, 0])
    loss = lambda m, xb, yb: F.cross_entropy(m(xb), yb)   # noqa: E731
    ctx = ScoreContext(grads=gradients(model, ["fc1", "conv", "fc2"], [(x, y)], loss))
    F.cross_entropy(ref(x), y).backward()
    saliency = (ref.fc2.weight * ref.fc2.weight.grad).abs().detach()
    prune_unstructured(model, 0.5, "snip", "local", targets=["fc2"], ctx=ctx)
    k = round(0.5 * saliency.numel())
    expected = saliency.reshape(-1).argsort(stable=True)[:k].sort().values
    assert torch.equal((model.fc2.weight.reshape(-1) == 0).nonzero().flatten(), expected)
    with pytest.raises(KilnError, match="'fc2': criterion snip needs gradients"):
        prune_unstructured(Net(), 0.5, "snip", targets=["fc2"])


def test_masks_survive_training_and_repeated_pruning_only_adds_zeros():
    model = Net()
    prune_unstructured(model, 0.5, "magnitude", "global")
    zero_before = {n: model.get_submodule(n).weight == 0 for n in ("fc1", "conv", "fc2")}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 12)), torch.randint(0, 5, (8,))).backward()
        opt.step()
    for n, z in zero_before.items():
        w = model.get_submodule(n).weight
        assert bool((w[z] == 0).all()) and int((w == 0).sum()) == int(z.sum())
    result = prune_unstructured(model, 0.75, "magnitude", "global")
    for n, z in zero_before.items():
        assert bool((model.get_submodule(n).weight[z] == 0).all())
    assert sum(r["zeros"] for r in result.report) == round(0.75 * sum(r["total"] for r in result.report))


def test_artifact_reloads_masks_and_weights_exactly(tmp_path):
    from kiln.runs.artifact import load_artifact, save_artifact
    from kiln.runs.transforms import TransformRecord

    path = tmp_path / "f.py"
    path.write_text("import torch\nfrom torch import nn\n"
                    "def net():\n    torch.manual_seed(0)\n"
                    "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), (torch.randn(2, 8),)\n")
    spec = f"py:{path}:net"
    from kiln.models.spec import load

    model = load(spec).model
    result = prune_unstructured(model, 0.6, "magnitude", "local")
    save_artifact(tmp_path / "run", model, spec=spec, dataset="", transforms=[TransformRecord.from_flat(result.record)])
    again = load_artifact(tmp_path / "run").model
    assert mask_of(again.get_submodule("0")) is not None
    x = torch.randn(3, 8)
    assert torch.equal(again(x), model(x))
    assert torch.equal(again.get_submodule("2").weight, model.get_submodule("2").weight)


def test_make_permanent_keeps_outputs_and_exports():
    model = Net()
    prune_unstructured(model, 0.7, "magnitude", "global")
    x = torch.randn(4, 12)
    expected = model(x)
    make_permanent(model)
    assert all(mask_of(m) is None for m in model.modules())
    assert set(model.state_dict()) == set(Net().state_dict())
    assert torch.equal(model(x), expected)
    program = torch.export.export(model, (x,))
    assert torch.allclose(program.module()(x), expected)


def test_activation_sparsity_zeroes_the_smallest_outputs_of_each_sample():
    model = Net()
    sparsify_activations(model, {"fc1": 0.25})
    seen = {}
    model.fc1.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    x = torch.randn(3, 12)
    model(x)
    dense = F.linear(x, model.fc1.weight, model.fc1.bias)
    out = seen["out"]
    assert ((out == 0).sum(1) == 5).all()          # round(0.25 * 20) per sample
    for i in range(3):
        keep = dense[i].abs().argsort(descending=True)[:15]
        assert torch.equal(out[i, keep], dense[i, keep])
    with pytest.raises(KilnError, match="activation ratio of module 'fc1': 1.0 is outside"):
        ActivationSparsity("fc1", 1.0)


def test_bad_input_is_a_one_line_error():
    with pytest.raises(KilnError, match=r"ratio 1.0 is outside \[0, 1\)"):
        prune_unstructured(Net(), 1.0)
    with pytest.raises(KilnError, match="module 'fc9': no such module"):
        prune_unstructured(Net(), 0.5, targets=["fc9"])
    with pytest.raises(KilnError, match="unknown pruning criterion 'l3'"):
        prune_unstructured(Net(), 0.5, "l3")
    with pytest.raises(KilnError, match=r"module 'act' \(ReLU\): no weight"):
        prune_unstructured(nn.ModuleDict({"act": nn.ReLU()}), 0.5, targets=["act"])


def test_agp_movement_hook_prunes_the_weights_moving_towards_zero():
    from kiln.prune.schedule import AGP
    from kiln.prune.unstructured import raw_weight

    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    prune_unstructured(model, 0.0)                      # all-ones masks, as a prune run starts AGP
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-1.0, 1.0, 2.0, -4.0]])
    g = torch.tensor([[1.0, 1.0, -1.0, 0.0], [0.5, -3.0, 1.0, 1.0]])
    with torch.no_grad():
        raw_weight(model[0]).copy_(w)
    raw_weight(model[0]).grad = g
    hook = AGP(["0"], final=0.5, criterion="movement", every=1, end=1.0)
    hook(model, 1, 1)                                   # last ramp step: the final ratio
    movement = -(w * g)                                 # [[-1, 2, 3, 0], [0.5, 3, -2, 4]]
    expected = movement.reshape(-1).argsort(stable=True)[:4]
    assert torch.equal((model[0].weight.reshape(-1) == 0).nonzero().flatten(), expected.sort().values)
    assert hook.history == [(1, 0.5)]

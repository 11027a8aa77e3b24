"""DARTS and the cell space against oracles: the single op, exact unrolled gradients, known argmaxes."""
import random

import pytest
import torch
from torch.func import functional_call

from kiln.errors import KilnError
from kiln.search.nas import darts
from kiln.search.nas.space import OPS, ZERO, CellSpace, Genotype, Macro, build_op, discrete_network, discretise

ALL_OPS = tuple(OPS.names())


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_with_one_hot_weights_is_exactly_that_op(stride):
    torch.manual_seed(0)
    space = CellSpace(ALL_OPS, nodes=2)
    mixed = darts.MixedOp(space, c=4, stride=stride).eval()
    x = torch.randn(3, 4, 9, 9)
    for k, name in enumerate(space.ops):
        weights = torch.zeros(len(space.ops))
        weights[k] = 1.0
        assert torch.equal(mixed(x, weights), mixed.ops[k](x)), name
    assert torch.equal(mixed.ops[space.ops.index(ZERO)](x), torch.zeros_like(mixed.ops[0](x)))


def _tiny(dtype=torch.float64):
    torch.manual_seed(0)
    space = CellSpace(("none", "skip_connect", "avg_pool_3x3", "sep_conv_3x3", "dil_conv_3x3"), nodes=2)
    model = darts.SearchNetwork(space, Macro(channels=2, layers=2, stem_stride=1, num_classes=3)).to(dtype)
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_(0, 0.5)
    gen = torch.Generator().manual_seed(1)
    batch = lambda: (torch.randn(6, 1, 6, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (6,), generator=gen))
    return model, batch(), batch()


def test_second_order_gradient_matches_exact_unrolled_gradient():
    """Oracle: autograd through the virtual step w' = w - xi (dL_train/dw + wd w), in float64.
    The finite-difference step is 1e-5 here: on a net this small, DARTS's 0.01 crosses ReLU kinks."""
    model, train_b, val_b = _tiny()
    xi, wd = 0.1, 3e-4
    approx = darts.second_order_alpha_grad(model, train_b, val_b, xi=xi, weight_decay=wd, fd_step=1e-5)

    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    w_names = [n for n in names if not n.startswith("alpha_")]
    a_names = [n for n in names if n.startswith("alpha_")]
    loss = lambda p, b: torch.nn.functional.cross_entropy(functional_call(model, p, (b[0],)), b[1])
    g = torch.autograd.grad(loss(params, train_b), [params[n] for n in w_names], create_graph=True)
    unrolled = {**params, **{n: params[n] - xi * (gi + wd * params[n]) for n, gi in zip(w_names, g)}}
    exact = torch.autograd.grad(loss(unrolled, val_b), [params[n] for n in a_names])

    first = darts.first_order_alpha_grad(model, val_b)
    for e, a, f in zip(exact, approx, first):
        assert torch.allclose(a, e, rtol=1e-6, atol=1e-9)
        assert (e - f).abs().max() > 100 * (a - e).abs().max()   # the second-order term is not negligible


def test_second_order_leaves_the_weights_unchanged():
    model, train_b, val_b = _tiny()
    before = [p.detach().clone() for p in model.weights()]
    darts.second_order_alpha_grad(model, train_b, val_b, xi=0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.weights()))


def test_discretise_picks_the_argmax_ops_and_top_two_edges():
    space = CellSpace(("none", "skip_connect", "max_pool_3x3", "sep_conv_3x3"), nodes=3)
    # edges: node0 <- 0,1; node1 <- 0,1,2; node2 <- 0,1,2,3  (9 edges); columns follow space.ops
    w = torch.tensor([
        [0.1, 0.2, 0.6, 0.1],   # n0<-0: max_pool (0.6)
        [0.1, 0.7, 0.1, 0.1],   # n0<-1: skip (0.7)
        [0.9, 0.05, 0.03, 0.02],  # n1<-0: 'none' dominates but is excluded; best real 0.05
        [0.1, 0.1, 0.1, 0.7],   # n1<-1: sep_conv (0.7)
        [0.2, 0.3, 0.4, 0.1],   # n1<-2: max_pool (0.4)
        [0.1, 0.5, 0.2, 0.2],   # n2<-0: skip 0.5
        [0.1, 0.1, 0.1, 0.7],   # n2<-1: sep 0.7
        [0.1, 0.1, 0.8, 0.0],   # n2<-2: max_pool 0.8
        [0.4, 0.2, 0.2, 0.2],   # n2<-3: 0.2
    ])
    cell = discretise(w, space)
    assert cell == ((("max_pool_3x3", 0), ("skip_connect", 1)),
                    (("sep_conv_3x3", 1), ("max_pool_3x3", 2)),
                    (("sep_conv_3x3", 1), ("max_pool_3x3", 2)))


def test_search_network_genotype_follows_its_alphas():
    space = CellSpace(("none", "skip_connect", "sep_conv_3x3"), nodes=2)
    net = darts.SearchNetwork(space, Macro(channels=2, layers=1))
    with torch.no_grad():
        net.alpha_normal.zero_()
        net.alpha_normal[:, 2] = 5.0     # every edge prefers sep_conv
        net.alpha_normal[1, 1] = 9.0     # node0 <- 1 prefers skip, strongest
    g = net.genotype()
    assert g.normal[0] == (("sep_conv_3x3", 0), ("skip_connect", 1))
    assert all(op == "sep_conv_3x3" for op, _ in g.normal[1])


def test_genotype_decodes_round_trips_and_builds():
    space = CellSpace(("none", "skip_connect", "max_pool_3x3", "sep_conv_5x5"), nodes=3)
    assert space.choices() == [2, 3, 2, 3, 3, 3, 3, 3, 4, 3, 4, 3] * 2
    g = space.sample(random.Random(0))
    assert Genotype.from_dict(g.to_dict()) == g
    for code in (space.choices(),):
        with pytest.raises(ValueError):
            space.decode(code)   # each entry one past its last option
    net = discrete_network(g, Macro(channels=4, layers=3))
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", [n for n in ALL_OPS])
def test_every_op_keeps_channels_and_halves_with_stride_two(name):
    x = torch.randn(2, 4, 7, 7)
    assert build_op(name, 4, 1, affine=True)(x).shape == (2, 4, 7, 7)
    assert build_op(name, 4, 2, affine=True)(x).shape == (2, 4, 4, 4)


def test_a_space_with_no_valid_point_is_an_error():
    with pytest.raises(KilnError, match="no valid architecture"):
        CellSpace(("none",))
    with pytest.raises(KilnError, match="unknown nas operation 'conv_9x9'"):
        CellSpace(("skip_connect", "conv_9x9"))
    with pytest.raises(KilnError, match="nodes"):
        CellSpace(("skip_connect",), nodes=0)


def test_warmup_leaves_the_alphas_alone_until_its_fraction_of_the_budget():
    from kiln.search.nas.fit import Tensors

    space = CellSpace(("none", "skip_connect", "sep_conv_3x3"), nodes=2)
    data = Tensors(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    macro = Macro(channels=2, layers=2, stem_stride=1)
    settings = dict(time_budget_s=60, max_epochs=1, batch_size=8, eval_samples=16)
    frozen = darts.search(space, macro, data, darts.DartsSettings(warmup_fraction=0.99, **settings), seed=0)
    moved = darts.search(space, macro, data, darts.DartsSettings(**settings), seed=0)
    torch.manual_seed(0)
    init = darts.SearchNetwork(space, macro, torch.Generator().manual_seed(0)).alpha_normal.softmax(-1)
    assert torch.allclose(torch.tensor(frozen.alphas["normal"]), init)   # 4 steps, all in warm-up
    assert not torch.allclose(torch.tensor(moved.alphas["normal"]), init)

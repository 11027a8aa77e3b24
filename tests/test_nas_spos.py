"""SPOS against oracles: the supernet itself, exact batch statistics, scipy's Kendall tau."""
import random

import pytest
import torch
from scipy.stats import kendalltau

from kiln.errors import KilnError
from kiln.search.nas import spos
from kiln.search.nas.config import SposSpace
from kiln.search.nas import fit
from kiln.search.nas.fit import Tensors

SPACE = SposSpace(blocks=("conv3x3", "conv5x5", "identity"), layers=3, channels=4, downsample_after=(0,))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _data(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Tensors(torch.randn(n, 1, 12, 12, generator=gen), torch.randint(0, 10, (n,), generator=gen))


@pytest.mark.parametrize("path", [(0, 1, 2), (2, 2, 2), (1, 0, 0)])
def test_extracted_path_equals_the_supernet_on_that_path(path):
    torch.manual_seed(0)
    net = spos.Supernet(SPACE, 1, 10)
    fit.train(spos.UniformPaths(net, seed=0), _data(), fit.Recipe(epochs=1, batch_size=16), seed=0)
    net.eval()
    x = _data(8, seed=1).x
    sub = net.extract(path)
    assert torch.equal(sub.eval()(x), net(x, path))
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in net.parameters())


def test_recalibrated_bn_holds_the_exact_batch_statistics():
    torch.manual_seed(0)
    net = spos.Supernet(SPACE, 1, 10)
    data = _data(32)
    spos.recalibrate_bn(spos.FixedPath(net, (0, 0, 0)), data, n_batches=1, batch_size=32, seed=0)
    with torch.no_grad():   # the whole split is one batch: the stem BN saw exactly the stem conv's output
        h = net.stem[0](data.x)
    bn = net.stem[1]
    assert torch.allclose(bn.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(bn.running_var, h.var(dim=(0, 2, 3), unbiased=True), rtol=1e-5)
    assert bn.momentum == 0.1 and not net.training


def test_uniform_paths_visit_every_block():
    net = spos.Supernet(SPACE, 1, 10)
    seen = set()
    hook = lambda module, inputs, output: seen.add(id(module))
    for layer in net.choices:
        for block in layer:
            block.register_forward_hook(hook)
    view = spos.UniformPaths(net, seed=0)
    for _ in range(40):
        view(torch.randn(1, 1, 12, 12))
    assert len(seen) == sum(len(layer) for layer in net.choices)


@pytest.mark.parametrize("seed", range(5))
def test_kendall_tau_matches_scipy_with_and_without_ties(seed):
    rng = random.Random(seed)
    a = [rng.randrange(6) for _ in range(15)]   # ties on purpose
    b = [x + rng.randrange(4) for x in a]
    assert spos.kendall_tau(a, b) == pytest.approx(kendalltau(a, b).statistic, abs=1e-12)
    c = [rng.random() for _ in range(12)]
    assert spos.kendall_tau(c, sorted(c)) == pytest.approx(kendalltau(c, sorted(c)).statistic, abs=1e-12)
    assert spos.kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0


@pytest.mark.parametrize("kwargs, match", [
    ({"blocks": ()}, "no valid architecture"),
    ({"blocks": ("conv9x9",)}, "unknown block 'conv9x9'"),
    ({"layers": 0}, "no valid architecture"),
    ({"downsample_after": (7,)}, "downsample_after"),
])
def test_bad_spos_spaces_are_one_line_errors(kwargs, match):
    with pytest.raises(KilnError, match=match):
        SposSpace(**kwargs)


def test_a_path_that_does_not_fit_is_an_error():
    with pytest.raises(KilnError, match="does not fit"):
        spos.PathNet(SPACE, (0, 5, 0), 1, 10)

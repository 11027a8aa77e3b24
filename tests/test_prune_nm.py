"""N:M sparsity: exactly N survivors, the largest, in every group of M along the input dimension."""
import pytest
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.prune.nm import is_nm, nm_mask, prune_nm


def brute_force(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Group by group with Python loops: the oracle for nm_mask on magnitudes."""
    keep = torch.zeros_like(w, dtype=torch.bool)
    flat_w = w.movedim(1, -1)
    flat_k = keep.movedim(1, -1)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in flat_w.shape[:-1]]).reshape(-1, flat_w.dim() - 1):
        row = flat_w[tuple(idx)]
        for g in range(0, row.numel(), m):
            order = sorted(range(m), key=lambda j: (-abs(row[g + j].item()), j))
            for j in order[:n]:
                flat_k[tuple(idx) + (g + j,)] = True
    return keep


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (1, 2)])
def test_each_group_keeps_exactly_n_of_the_largest(n, m):
    torch.manual_seed(0)
    for w in (torch.randn(6, 16), torch.randn(4, 8, 3, 3)):
        keep = nm_mask(w.abs(), n, m)
        assert torch.equal(keep, brute_force(w, n, m))
        groups = keep.movedim(1, -1).reshape(-1, m).sum(1)
        assert bool((groups == n).all())


def test_prune_nm_on_a_model_with_exact_counts_and_a_skipped_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    result = prune_nm(model, 2, 4)
    assert result.record["masks"] == ["1", "3"]
    assert result.record["skipped"] == [{"module": "0", "reason": "input dimension 3 is not a multiple of M=4"}]
    for row in result.report:
        assert row["zeros"] == row["total"] // 2
        assert is_nm(model.get_submodule(row["module"]).weight, 2, 4)
    assert int((model.get_submodule("0").weight == 0).sum()) == 0


def test_bad_nm_and_ungroupable_named_module_are_errors():
    model = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(KilnError, match="N:M sparsity 4:4 needs 0 < N < M"):
        prune_nm(model, 4, 4)
    with pytest.raises(KilnError, match="module '0': cannot prune 2:4: input dimension 6 is not a multiple of M=4"):
        prune_nm(model, 2, 4, targets=["0"])

"""Another library's Linear (PyTorch Geometric's, inside every GCNConv) is quantized, pruned and
factorised as the nn.Linear it is (kiln.models.linear), and each artifact reloads exactly.

Oracles: PyG's own forward (F.linear of the same tensors) for the swap; the counts each
optimisation must give (8-bit weights, zeros, 2:4 groups, channels, ranks); the saved model's own
outputs, torch.equal after reload (tests/test_artifact.py's conformance, on zoo:gcn)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torch_geometric")

from kiln.models.linear import as_torch_linears  # noqa: E402
from kiln.models.spec import load  # noqa: E402
from kiln.runs.artifact import load_artifact, save_artifact  # noqa: E402
from kiln.runs.transforms import TransformRecord  # noqa: E402

torch.set_num_threads(1)
LINEARS = ("conv1.lin", "conv2.lin")   # 34 -> 16 and 16 -> 4


def _gcn():
    loaded = load("zoo:gcn")
    return loaded.model.eval(), loaded.example_kwargs


def _run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs)


def test_the_swap_keeps_the_parameters_names_and_outputs():
    from torch_geometric.nn.dense.linear import Linear as PygLinear

    model, kwargs = _gcn()
    before = _run(model, kwargs)
    params = {n: p for n, p in model.named_parameters()}
    assert all(type(model.get_submodule(f)) is PygLinear for f in LINEARS)
    assert as_torch_linears(model) == list(LINEARS)
    assert all(type(model.get_submodule(f)) is nn.Linear for f in LINEARS)
    assert {n: p for n, p in model.named_parameters()} == params   # the very Parameters, same names
    assert torch.equal(_run(model, kwargs), before)
    assert as_torch_linears(model) == []   # idempotent


def _saved_and_restored(model, record, kwargs, tmp_path):
    record = record if isinstance(record, TransformRecord) else TransformRecord.from_flat(record)
    out = save_artifact(tmp_path / "run", model, spec="zoo:gcn", dataset="karate", transforms=[record])
    again = load_artifact(out)
    assert torch.equal(_run(again.model, kwargs), _run(model.eval(), kwargs))
    return again.model


@pytest.mark.parametrize("weight", ["int8", "fp8_e4m3"])
def test_quantization_selects_both_gcn_linears_and_reloads(weight, tmp_path):
    from kiln.data import load_dataset
    from kiln.quant.apply import quant_record, report
    from kiln.quant.config import parse_config
    from kiln.quant.modules import QuantOp
    from kiln.quant.run import prepare
    from kiln.train.evaluation import calibration_batches
    from kiln.train.tasks import forward

    model, kwargs = _gcn()
    reference = _run(model, kwargs)
    config = parse_config({"weight": weight, "input": weight})
    batches = calibration_batches(load_dataset("karate", seed=0), 1, 1, 0)
    prepare(model, config, batches)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, QuantOp)) == list(LINEARS)
    rep = report(load("zoo:gcn").model.eval(), model, lambda m: forward(m, batches[0]))
    assert rep["avg_weight_bits"] == 8.0 and rep["quantized_layers"] == 2
    assert not torch.equal(_run(model, kwargs), reference)   # the weights and inputs were rounded
    _saved_and_restored(model, quant_record(model, config), kwargs, tmp_path)


def test_2_4_masks_the_linear_whose_input_groups_and_the_masks_reload(tmp_path):
    from kiln.prune.nm import is_nm, prune_nm

    model, kwargs = _gcn()
    result = prune_nm(model, 2, 4)
    assert result.record["masks"] == ["conv2.lin"]   # conv1.lin's 34 inputs do not split into 4s
    assert result.record["skipped"] == [{"module": "conv1.lin", "reason": "input dimension 34 is not a multiple of M=4"}]
    w = model.get_submodule("conv2.lin").weight
    assert is_nm(w, 2, 4) and int((w == 0).sum()) == w.numel() // 2
    # masks kept (as a fine-tune saves its init checkpoint and reloads it): the restore fits
    again = _saved_and_restored(model, result.record | {"permanent": False}, kwargs, tmp_path)
    assert torch.equal(again.get_submodule("conv2.lin").weight, w)


def test_unstructured_pruning_zeroes_half_of_the_gcn_weights_and_reloads(tmp_path):
    from kiln.prune.unstructured import prune_count, prune_unstructured

    model, kwargs = _gcn()
    result = prune_unstructured(model, 0.5, "magnitude", "global")
    assert result.record["masks"] == list(LINEARS)
    n = 34 * 16 + 16 * 4
    assert sum(r["zeros"] for r in result.report) == prune_count(0.5, n) == n // 2
    _saved_and_restored(model, result.record | {"permanent": False}, kwargs, tmp_path)


def test_structured_pruning_halves_the_hidden_channels_through_message_passing(tmp_path):
    from kiln.prune.structured import prune_structured

    model, kwargs = _gcn()
    result = prune_structured(model, (), 0.5, example_kwargs=kwargs)
    pruned = result.model
    # the hidden width is produced by conv1.lin, offset by conv1's bias after the scatter, read by
    # conv2.lin; the output classes reach the model's output and stay
    assert pruned.get_submodule("conv1.lin").weight.shape == (8, 34)
    assert pruned.get_submodule("conv1").bias.shape == (8,)
    assert pruned.get_submodule("conv2.lin").weight.shape == (4, 8)
    assert result.report["params_after"] == 628 - 8 * 34 - 8 - 8 * 4
    _saved_and_restored(pruned, result.record, kwargs, tmp_path)


def test_low_rank_factorises_the_gcn_linears_and_reloads(tmp_path):
    from kiln.lowrank.apply import factorize
    from kiln.lowrank.config import parse_config
    from kiln.lowrank.svd import LowRankLinear

    model, kwargs = _gcn()
    model, decisions, record = factorize(model, parse_config({"rank": 2}).plan(model))
    assert record["modules"] == {f: {"type": "Linear", "rank": 2} for f in LINEARS}
    assert all(isinstance(model.get_submodule(f), LowRankLinear) for f in LINEARS)
    _saved_and_restored(model, record, kwargs, tmp_path)

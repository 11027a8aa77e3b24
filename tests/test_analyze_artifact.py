"""Artifacts costed as they run (kiln.analysis.execution, kiln.runs.execution), against exact
arithmetic: a 2:4 Linear does half its dense FLOPs and stores half its weights plus 2 bits per
kept one; an int8 Linear reads one byte per weight and per input element and runs at the int8
peak; MXFP4 elements run at fp8 where the profile has it, bf16 where not; structured pruning's
shapes are the model's own (FLOPs equal flop_counter's on the pruned model)."""
from __future__ import annotations

import pytest
import torch

from kiln.analysis.execution import (Execution, Family, ModuleExecution, Precision, Sparsity, compute_key,
                                     effective_costs, holds)
from kiln.analysis.oracle import flop_counter_flops
from kiln.analysis.report import analyze
from kiln.hardware.profiles import load_profile
from kiln.models.spec import load
from kiln.runs.artifact import load_source, save_artifact
from kiln.runs.execution import as_it_runs
from kiln.runs.transforms import TransformRecord

H100, A100 = load_profile("h100"), load_profile("a100")
LINEARS = {"layers.0": (256, 784), "layers.2": (128, 256), "head": (10, 128)}   # zoo:mlp, batch 1


def _run(tmp_path, make) -> tuple:
    loaded = load("zoo:mlp")
    model, record = make(loaded.model)
    out = save_artifact(tmp_path / "run", model, spec="zoo:mlp", dataset="mnist", transforms=[record])
    source = load_source(str(out))
    captured, execution = as_it_runs(source.model, source.transforms)
    return loaded, captured, execution


def _analyze(loaded, model, execution, hw):
    import dataclasses

    return analyze(dataclasses.replace(loaded, model=model), hw, measure_time=False, execution=execution)


def _nm(model):
    from kiln.prune.nm import prune_nm

    result = prune_nm(model, 2, 4)
    return result.model, TransformRecord.from_flat(result.record)


def _quant(table):
    def make(model):
        from kiln.quant.apply import quant_record
        from kiln.quant.config import parse_config
        from kiln.quant.run import prepare

        config = parse_config(table)
        prepare(model, config, [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))],
                forward=lambda m, b: m(b))
        return model, quant_record(model, config)
    return make


def test_two_of_four_halves_the_linears_flops_and_stores_kept_weights_with_two_bit_indices(tmp_path):
    loaded, model, execution = _run(tmp_path, _nm)
    a = _analyze(loaded, model, execution, H100)
    dense = sum(2 * o * i for o, i in LINEARS.values())
    assert a.flops == dense == flop_counter_flops(loaded)        # the graph itself: dense kernels
    assert a.runs_as.flops == dense // 2
    weights = sum(o * i * (0.5 * 32 + 0.5 * 2) / 8 for o, i in LINEARS.values()) + 4 * sum(o for o, _ in LINEARS.values())
    assert a.runs_as.weight_bytes == weights                     # biases stay fp32
    assert a.runs_as.sparse_modules == 3 and "2:4" in a.runs_as.notes[0]
    assert a.runs_as.roofline.latency_s < a.roofline.latency_s


def test_int8_linears_read_a_byte_per_weight_and_input_and_run_at_the_int8_peak(tmp_path):
    loaded, model, execution = _run(tmp_path, _quant({"weight": "int8", "input": "int8", "targets": ["Linear"]}))
    assert not any(type(m).__name__ == "QuantOp" for m in model.modules())     # unwrapped to the float op
    a = _analyze(loaded, model, execution, H100)
    assert a.flops == a.runs_as.flops == flop_counter_flops(loaded)
    assert a.runs_as.keys == {"int8": 3}
    row = {n.module: n for n in a.graph.ops if n.op == "linear"}["layers.0"]
    cost, key = effective_costs(a.graph, execution, H100)[row.name]
    scales = 4 * 256 / (784 * 256) * 8     # per-channel fp32 scales, in bits per weight
    assert key == "int8"
    assert cost.bytes_read == round(784 * 256 * (8 + scales) / 8) + 784 + 4 * 256   # weight, int8 input, bias
    assert cost.bytes_written == 4 * 256                                            # output left fp32


@pytest.mark.parametrize("hw, key", [(H100, "fp8"), (A100, "bf16")])
def test_mxfp4_runs_at_the_fastest_profile_format_holding_e2m1(tmp_path, hw, key):
    mx = {"format": "mxfp4", "block": 16}      # 784 inputs: blocks of 16 (MX's 32 does not divide it)
    loaded, model, execution = _run(tmp_path, _quant({"weight": mx, "input": mx, "targets": ["Linear"]}))
    a = _analyze(loaded, model, execution, hw)
    assert a.runs_as.keys == {key: 3}
    weights = sum(o * i * 4.5 / 8 for o, i in LINEARS.values()) + 4 * sum(o for o, _ in LINEARS.values())
    assert a.runs_as.weight_bytes == weights


def test_weight_only_quantization_saves_bytes_not_compute(tmp_path):
    loaded, model, execution = _run(tmp_path, _quant({"weight": {"format": "int", "bits": 4}, "targets": ["Linear"]}))
    a = _analyze(loaded, model, execution, H100)
    assert a.runs_as.keys == {"fp32": 3} and a.runs_as.weight_bytes < a.param_bytes / 7


def test_structured_pruning_is_costed_on_its_own_smaller_shapes(tmp_path):
    from kiln.prune.structured import prune_structured

    def make(model):
        result = prune_structured(model, loaded_inputs.example_inputs, ratio=0.5)
        return result.model, TransformRecord.from_flat(result.record)

    loaded_inputs = load("zoo:mlp")
    loaded, model, execution = _run(tmp_path, make)
    import dataclasses

    pruned = dataclasses.replace(loaded, model=model)
    a = _analyze(loaded, model, execution, H100)
    assert execution.modules == {} and a.flops == flop_counter_flops(pruned) < flop_counter_flops(loaded)


def _p(family, bits, exp=0, man=0):
    return Precision("x", family, bits, float(bits), exp, man)


@pytest.mark.parametrize("p, key, held", [
    (_p(Family.INT, 8), "int8", True), (_p(Family.INT, 9), "int8", False), (_p(Family.INT, 4), "int4", True),
    (_p(Family.INT, 8), "bf16", True), (_p(Family.INT, 8), "fp8", False), (_p(Family.INT, 12), "fp16", True),
    (_p(Family.FLOAT, 4, 2, 1), "fp8", True), (_p(Family.FLOAT, 8, 4, 3), "fp8", True),
    (_p(Family.FLOAT, 8, 5, 2), "fp8", True), (_p(Family.FLOAT, 16, 8, 7), "fp16", False),
    (_p(Family.FLOAT, 16, 8, 7), "bf16", True), (_p(Family.FLOAT, 4, 2, 1), "int8", False),
])
def test_a_profile_format_holds_exactly_the_elements_its_bits_represent(p, key, held):
    assert holds(key, p) is held


def test_mixed_operands_run_at_the_fastest_format_holding_both():
    int8, fp8 = _p(Family.INT, 8), _p(Family.FLOAT, 8, 4, 3)
    assert compute_key(int8, int8, "fp32", H100) == "int8"
    assert compute_key(int8, fp8, "fp32", H100) == "bf16"       # fp8 cannot hold int8, int8 not fp8
    assert compute_key(None, int8, "fp32", H100) == "fp32"


def test_an_execution_merges_later_transforms_over_earlier_ones():
    sparse = ModuleExecution(sparsity=Sparsity(0.5, "2:4", 1.0))
    q = ModuleExecution(_p(Family.INT, 8), _p(Family.INT, 8))
    merged = Execution({"a": sparse}, ("s",)).merged(Execution({"a": q}, ("q",)))
    assert merged.modules["a"] == ModuleExecution(q.weight, q.input, None, sparse.sparsity)
    assert merged.notes == ("s", "q")


def test_unstructured_sparsity_counts_the_kept_weights_from_the_weights_themselves(tmp_path):
    from kiln.prune.unstructured import prune_unstructured

    def make(model):
        result = prune_unstructured(model, 0.5, "magnitude", "local")
        return result.model, TransformRecord.from_flat(result.record)

    loaded, model, execution = _run(tmp_path, make)
    a = _analyze(loaded, model, execution, H100)
    kept = {fqn: int((model.get_submodule(fqn).weight != 0).sum()) for fqn in LINEARS}
    assert a.runs_as.flops == sum(2 * k for k in kept.values())               # batch 1: 2 per kept weight
    assert a.runs_as.weight_bytes == sum(round((32 * k + o * i) / 8) for k, (o, i) in zip(kept.values(), LINEARS.values())) \
        + 4 * sum(o for o, _ in LINEARS.values())                           # kept fp32 values + a 1-bit mask


def test_early_exit_is_costed_as_the_sample_that_runs_the_whole_backbone(tmp_path):
    from kiln.adapt.early_exit import EarlyExit, heads_for, probe
    from kiln.adapt.restore import record_of

    def make(model):
        names, shapes, classes = probe(model, ["layers.1"], (torch.randn(1, 1, 28, 28),), {})
        ee = EarlyExit(model, names, heads_for(shapes, classes, 1, 0), "entropy", 0.5)
        return ee, TransformRecord.from_flat(record_of(ee, shapes, classes, 1, 0))

    loaded, model, execution = _run(tmp_path, make)
    a = _analyze(loaded, model, execution, H100)
    assert a.flops == a.runs_as.flops == flop_counter_flops(loaded) and "early exit" in execution.notes[0]


def test_kiln_analyze_on_a_run_directory_prints_and_writes_it_as_it_runs(tmp_path):
    import json

    from typer.testing import CliRunner

    from kiln.cli.main import app
    from kiln.prune.nm import prune_nm

    result = prune_nm(load("zoo:mlp").model, 2, 4)
    run = save_artifact(tmp_path / "run", result.model, spec="zoo:mlp", dataset="mnist",
                        transforms=[TransformRecord.from_flat(result.record)])
    out = CliRunner().invoke(app, ["analyze", str(run), "--hardware", "h100", "--no-measure", "--json",
                                   str(tmp_path / "a.json")])
    assert out.exit_code == 0, out.output
    data = json.loads((tmp_path / "a.json").read_text())
    dense = sum(2 * o * i for o, i in LINEARS.values())
    assert data["source"]["flops"] == data["flops"] == dense and data["as_it_runs"]["flops"] == dense // 2
    assert "as it runs on h100" in out.output and "2:4 sparsity" in out.output


def test_a_factorised_linear_is_costed_as_its_two_factors(tmp_path):
    from kiln.lowrank.apply import factorize
    from kiln.lowrank.config import parse_config

    def make(model):
        plan = parse_config({"energy": 0.9, "rules": [{"match": "fqn:layers.0", "rank": 8}]}).plan(model)
        model, _, record = factorize(model, plan)
        return model, TransformRecord.from_flat(record)

    loaded, model, execution = _run(tmp_path, make)
    a = _analyze(loaded, model, execution, H100)
    import dataclasses

    o, i = LINEARS["layers.0"]
    assert execution.modules == {} and a.runs_as.keys == {"fp32": 6}     # every Linear is now two
    assert a.flops == a.runs_as.flops == flop_counter_flops(dataclasses.replace(loaded, model=model))
    assert {n.shape for n in a.graph.ops if n.module.startswith("layers.0")} >= {(1, 8), (1, o)}

"""The FPGA estimator against yosys (the rows benchmarks/hw_calibrate.py recorded from yosys
0.70 on kiln hw emit's layers), and the hardware objectives of `kiln search` against the models
they come from."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.hw.estimate import COEFFICIENTS, Target, dsp_count, estimate_features

ROOT = Path(__file__).resolve().parents[1]
ALL_ROWS = json.loads((ROOT / "benchmarks/results/hw_calibration.json").read_text())["rows"]
ROWS = [r for r in ALL_ROWS if not r.get("validation")]      # what the coefficients were fitted on
SMALL = f"py:{ROOT / 'benchmarks/hw_small_mlp.py'}:small_mlp"


def _id(row: dict) -> str:
    return f"{row['target']}-{row['design']}-{row['layer']}"


# known misses (benchmarks/hw_cost_models.py prints them): the last layer at reuse K (G = 1, so each
# output's requantization multiplier is a constant) synthesizes to 5,324 LUTs and 36 DSPs, not
# the ~1,100 and 20 the terms give; why (yosys on constant multipliers?) is not found yet
KNOWN_OFF = {"xilinx-w8a8-layers.0=64-head=32-head"}


@pytest.mark.parametrize("row", [pytest.param(r, marks=pytest.mark.xfail(strict=True, reason="known miss"))
                                 if _id(r) in KNOWN_OFF else r for r in ALL_ROWS], ids=_id)
def test_dsps_are_exactly_yosys_and_block_rams_within_one_in_ten(row):
    luts, ffs, dsps, brams = estimate_features(row["features"], Target(row["target"]))
    assert dsps == row["dsps"]
    assert abs(brams - row["brams"]) <= 0.1 * row["brams"]     # yosys mixes RAMB18 aspect ratios


CASES = [pytest.param(r, marks=pytest.mark.xfail(strict=True, reason="known miss")) if _id(r) in KNOWN_OFF else r
         for r in ROWS]


@pytest.mark.parametrize("row", CASES, ids=_id)
def test_luts_are_within_15_percent_of_yosys_on_the_calibration_rows(row):
    luts = estimate_features(row["features"], Target(row["target"]))[0]
    assert abs(luts - row["luts"]) <= 0.15 * row["luts"]


def test_dsp_mapping_follows_yosys_mul2dsp_widths():
    # synth_xilinx: DSP_A_MINWIDTH=2, DSP_B_MINWIDTH=2, DSP_Y_MINWIDTH=9, 25 x 18 per DSP48E1
    assert dsp_count(8, 8, Target.XILINX) == 1
    assert dsp_count(4, 4, Target.XILINX) == 0          # an 8-bit product: LUTs
    assert dsp_count(24, 18, Target.XILINX) == 1
    assert dsp_count(1, 16, Target.XILINX) == 0
    # synth_ice40 -dsp: DSP_Y_MINWIDTH=11, 16 x 16 per SB_MAC16
    assert dsp_count(4, 4, Target.ICE40) == 0 and dsp_count(8, 8, Target.ICE40) == 1
    assert dsp_count(21, 18, Target.ICE40) == 3          # 16x16, 16x2, 5x16; 5x2 is LUTs


@pytest.fixture(scope="module")
def quantized_small(tmp_path_factory):
    from kiln.quant.config import parse_config
    from kiln.quant.run import quantize_run

    out = tmp_path_factory.mktemp("q") / "q4"
    cfg = parse_config({"targets": ["Linear"], "weight": {"format": "int", "bits": 4, "granularity": "channel"},
                        "input": {"format": "int", "bits": 4, "granularity": "tensor", "calib": "minmax"}})
    quantize_run(SMALL, cfg, out, dataset="digits", calib_batches=1, evaluate=False)
    return out


@pytest.mark.skipif(not COEFFICIENTS["xilinx"]["luts"], reason="estimator not calibrated yet")
def test_estimating_a_quantized_run_prices_the_design_emit_writes(quantized_small, tmp_path):
    from kiln.hw.design import EmitConfig, emit, load_design
    from kiln.hw.estimate import estimate_layers, estimate_model
    from kiln.runs.artifact import load_source

    design = emit(str(quantized_small), tmp_path / "d", EmitConfig(reuse=0, check_samples=0))
    from_design = estimate_layers(load_design(tmp_path / "d")[1], Target.ICE40)
    source = load_source(str(quantized_small))
    from_model = estimate_model(source.model, source.example_inputs[0], Target.ICE40, reuse=0)
    assert from_design == from_model
    assert from_model.latency == design["cycles"]["latency"]     # the emitter's own prediction


def test_systolic_objectives_are_the_models_per_layer_sums():
    from kiln.graph.capture import capture
    from kiln.hw.gemms import graph_gemms
    from kiln.hw.systolic import ArrayConfig, Dataflow, layer_cost
    from kiln.models.spec import load
    from kiln.search.objectives import HwConfig, systolic_scores

    gemms = graph_gemms(capture(load(SMALL)))
    bits = {"layers.0": 4, "head": 8}
    got = systolic_scores(gemms, bits, {"systolic_cycles", "systolic_energy_uj"}, HwConfig(array="8x8", dataflow="os"))
    costs = [layer_cost(g, ArrayConfig(8, 8, Dataflow.OS, word_bits=bits[g.name])) for g in gemms]
    assert got["systolic_cycles"] == sum(c.cycles for c in costs)
    assert got["systolic_energy_uj"] == pytest.approx(sum(c.energy_pj for c in costs) * 1e-6)
    # narrower operands: the same cycles, less energy
    wide = systolic_scores(gemms, {"layers.0": 8, "head": 8}, {"systolic_energy_uj"}, HwConfig(array="8x8", dataflow="os"))
    assert wide["systolic_energy_uj"] > got["systolic_energy_uj"]

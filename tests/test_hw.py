"""kiln hw: lowering, the integer model, the emitter's bad inputs, and the RTL in Icarus.

Oracles: exact integer arithmetic (brute force over the extreme inputs), kiln's fake-quantized
model, numpy's round-half-even, and the simulator (every output bit against the integer model).
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.hw import intmodel
from kiln.hw.check import compare
from kiln.hw.design import EmitConfig, emit, load_design, parallelism, predict_cycles
from kiln.hw.ir import lower
from kiln.hw.tools import find_tool, first_error_line, run_yosys
from kiln.quant.apply import calibrate, quantize
from kiln.quant.config import parse_config


def quantized(model: nn.Module, table: dict, shape=(1, 8), seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(16, *shape[1:], generator=g) for _ in range(2)]
    quantize(model, parse_config(table))
    calibrate(model, batches, lambda m, b: m(b))
    return model.eval()


INT8 = {"targets": ["Linear", "Conv2d"], "weight": "int8", "input": "int8"}
FIXED = {"targets": ["Linear", "Conv2d"], "weight": {"format": "fixed", "width": 6, "frac": 4},
         "input": {"format": "fixed", "width": 8, "frac": 4}}


def mlp(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6, bias=bias), nn.ReLU(), nn.Linear(6, 5, bias=bias), nn.ReLU(),
                         nn.Linear(5, 3, bias=bias))


def test_round_shift_is_round_half_to_even():
    v = np.arange(-600, 600, dtype=np.int64)
    for s in (1, 2, 3, 5):
        assert np.array_equal(intmodel.round_shift(v, s), np.round(v / 2.0 ** s).astype(np.int64))


def test_accumulator_range_is_attained_by_the_extreme_inputs():
    model = quantized(mlp(), INT8)
    layers = lower(model, torch.randn(1, 8))
    lay = layers[0]
    w = lay.weight.reshape(lay.n, -1)
    lo, hi = lay.acc_range()
    x_hi = np.where(w > 0, lay.in_hi, lay.in_lo)       # per channel: the input that maximises it
    x_lo = np.where(w > 0, lay.in_lo, lay.in_hi)
    assert hi == max(int((w[c] * x_hi[c]).sum()) for c in range(lay.n))
    assert lo == min(int((w[c] * x_lo[c]).sum()) for c in range(lay.n))
    assert 2 ** (lay.acc_bits - 2) <= max(-lo, hi) < 2 ** (lay.acc_bits - 1)


def test_power_of_two_scales_without_bias_are_shifts_and_exact():
    model = quantized(mlp(bias=False), FIXED)
    layers = lower(model, torch.randn(1, 8))
    assert all(lay.meta["shift_only"] for lay in layers[:-1])
    rep = compare(model, layers, torch.randn(300, 8, generator=torch.Generator().manual_seed(1)))
    assert all(r["codes_equal"] == 1.0 for r in rep["input_layers"])   # every hidden code equal
    assert rep["output_max_diff_lsb"] <= 0.5 + 1e-6                   # the last rounding only


def test_integer_model_matches_fake_quant_int8_mlp_and_cnn():
    model = quantized(mlp(), INT8)
    rep = compare(model, lower(model, torch.randn(1, 8)), torch.randn(300, 8, generator=torch.Generator().manual_seed(2)))
    assert min(r["codes_equal"] for r in rep["input_layers"]) > 0.99
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        cnn[1].running_mean.uniform_(-0.3, 0.3)
        cnn[1].running_var.uniform_(0.5, 2.0)
    cnn = quantized(cnn, INT8, shape=(1, 1, 12, 12))
    layers = lower(cnn, torch.randn(1, 1, 12, 12))
    assert [lay.kind for lay in layers] == ["dense", "maxpool", "dense", "avgpool", "dense"]
    rep = compare(cnn, layers, torch.randn(200, 1, 12, 12, generator=torch.Generator().manual_seed(3)))
    assert min(r["codes_equal"] for r in rep["input_layers"]) > 0.99
    assert rep["argmax_agreement"] > 0.97


def test_unsupported_layer_and_residual_are_named():
    model = quantized(nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 3)), INT8)
    with pytest.raises(KilnError, match=r"layer 1 is a GELU.*supported: Linear"):
        lower(model, torch.randn(1, 8))

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) + x)
    model = quantized(Residual(), INT8)
    with pytest.raises(KilnError, match=r"residual add"):
        lower(model, torch.randn(1, 8))
    model = quantized(mlp(), {"targets": ["Linear"], "weight": "fp8_e4m3", "input": "int8"})
    with pytest.raises(KilnError, match=r"layer 0 weight has format .*supported: int"):
        lower(model, torch.randn(1, 8))


def test_reuse_factor_must_divide_the_layer():
    lay = lower(quantized(mlp(), INT8), torch.randn(1, 8))[0]      # K=8, N=6
    assert parallelism(lay, 8) == (6, 1) and parallelism(lay, 2) == (6, 4) and parallelism(lay, 24) == (2, 1)
    with pytest.raises(KilnError, match=r"reuse factor 5 does not divide layer 0 \(K=8 inputs x N=6 outputs\)"):
        parallelism(lay, 5)


def test_missing_tool_and_yosys_failure_are_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("kiln.hw.tools._search_dirs", lambda: ["/nonexistent"])
    with pytest.raises(KilnError, match=r"^iverilog not found .* install it with: apt-get install iverilog"):
        find_tool("iverilog")
    assert first_error_line("junk\nbad.v:1: ERROR: syntax error\nmore") == "bad.v:1: ERROR: syntax error"


def test_yosys_failure_is_its_first_error_line(tmp_path):
    (tmp_path / "bad.v").write_text("module b(input x; endmodule\n")
    with pytest.raises(KilnError, match=r"^yosys failed: bad.v:1: ERROR: syntax error"):
        run_yosys("read_verilog -sv bad.v", cwd=tmp_path)


TINY = textwrap.dedent('''
    import torch
    from torch import nn
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 4), nn.ReLU(), nn.Linear(4, 10)).eval(), (torch.randn(1, 1, 28, 28),)
''')


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A quantized kiln run of a 784-4-10 MLP on MNIST (what `kiln quantize` writes)."""
    from kiln.quant.run import quantize_run

    d = tmp_path_factory.mktemp("hw")
    (d / "tiny.py").write_text(TINY)
    quantize_run(f"py:{d / 'tiny.py'}:make", parse_config(INT8), d / "q", dataset="mnist", calib_batches=1,
                 evaluate=False)
    return d / "q"


def test_emit_refuses_bad_reuse_and_writes_nothing(tiny_run, tmp_path):
    with pytest.raises(KilnError, match="reuse factor 5 does not divide layer 1"):
        emit(str(tiny_run), tmp_path / "out", EmitConfig(reuse=5, check_samples=0))
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_emitted_rtl_in_icarus_is_bit_exact_with_predicted_cycles(tiny_run, tmp_path):
    from kiln.hw.verify import VerifyConfig, verify

    emit(str(tiny_run), tmp_path / "d", EmitConfig(layer_reuse=(("1", 196), ("3", 8)), check_samples=16))
    design, layers = load_design(tmp_path / "d")
    assert design["fake_quant_check"]["argmax_agreement"] > 0.9
    assert [r["po"] for r in design["layers"]] == [4, 5] and [r["pi"] for r in design["layers"]] == [4, 1]
    assert predict_cycles(layers)["latency"] == (196 + 4) + (8 + 4)
    rep = verify(tmp_path / "d", VerifyConfig(samples=4, fake_quant=False))
    assert rep["bit_exact"] == 4 and rep["accuracy_rtl"] == rep["accuracy_integer_model"]
    assert rep["latency_cycles"]["measured"] == (196 + 4) + (8 + 4) and rep["cycles_match"]
    assert rep["interval_cycles"]["measured"] == 196 + 3 + 2
    assert json.loads((tmp_path / "d" / "design.json").read_text())["cycles"] == design["cycles"]


TINY_CNN = textwrap.dedent('''
    import torch
    from torch import nn
    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(2, 3, 3, padding=1, stride=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                            nn.Linear(12, 10))
        return net.eval(), (torch.randn(1, 1, 8, 8),)
''')


@pytest.mark.slow
def test_emitted_cnn_in_icarus_is_bit_exact(tmp_path):
    """Conv2d with padding, folded BatchNorm, max and average pools, flatten, through the RTL."""
    from kiln.hw.verify import VerifyConfig, verify
    from kiln.quant.run import quantize_run

    (tmp_path / "tiny_cnn.py").write_text(TINY_CNN)
    quantize_run(f"py:{tmp_path / 'tiny_cnn.py'}:make", parse_config(INT8), tmp_path / "q", dataset="digits",
                 calib_batches=1, evaluate=False)
    emit(str(tmp_path / "q"), tmp_path / "d", EmitConfig(layer_reuse=(("0", 3), ("4", 18), ("8", 12)), check_samples=16))
    design, layers = load_design(tmp_path / "d")
    busy = [64 * 3 + 3, 0, 16 * 18 + 3, 0, 12 + 3]
    assert design["cycles"]["latency"] == sum(b + 1 for b in busy)
    rep = verify(tmp_path / "d", VerifyConfig(samples=3, fake_quant=False))
    assert rep["bit_exact"] == 3
    assert rep["latency_cycles"]["measured"] == sum(b + 1 for b in busy) and rep["cycles_match"]
    assert rep["interval_cycles"]["measured"] == max(busy) + 2


@pytest.mark.slow
@pytest.mark.parametrize("target", ["generic", "ice40"])
def test_synth_counts_every_layer_and_at_least_its_frame_registers(tiny_run, tmp_path, target):
    from kiln.hw.synth import SynthConfig, Target, synth

    emit(str(tiny_run), tmp_path / "d", EmitConfig(layer_reuse=(("1", 196), ("3", 8)), check_samples=0))
    design, layers = load_design(tmp_path / "d")
    rep = synth(tmp_path / "d", SynthConfig(target=Target(target)))
    assert rep["yosys"].startswith("Yosys 0.")
    for row, lay in zip(rep["layers"], layers):
        # the input and output frames are registers: at least their bits are flip-flops
        frames = np.prod(lay.in_shape) * lay.in_bits + np.prod(lay.out_shape) * lay.out_bits
        assert row["ff"] >= frames and row["lut"] > 0
    assert rep["total"]["ff"] >= sum(r["ff"] for r in rep["layers"])
    if target == "ice40":
        assert rep["nextpnr"]["fits"] in (True, False)


def test_verify_takes_held_out_digits_from_test_then_val():
    from kiln.data import load_dataset
    from kiln.hw.verify import _inputs

    design = {"dataset": "digits", "data_seed": 0, "source": "x"}
    splits = load_dataset("digits", seed=0)
    n_test = len(splits.test)
    x, y = _inputs(design, n_test + 5, "heldout")
    assert len(x) == n_test + 5
    assert torch.equal(x[n_test], splits.val[0][0]) and torch.equal(x[0], splits.test[0][0])
    assert int(y[n_test + 4]) == int(splits.val[4][1])
    with pytest.raises(KilnError, match="--split must be one of test, val, heldout"):
        _inputs(design, 4, "train")

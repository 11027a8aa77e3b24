"""kiln.quant.lowp: real int8 Linears. Oracles: an exact integer re-computation of W8A8
(per-token activations, per-channel weights), the fp32 model within the error int8 rounding
allows, the weights' storage dtype, and inductor's count of oneDNN int8 linears."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.quant import lowp

# Two int8 roundings (activation, weight) of Gaussian data, per row, over <= 3 layers: each is
# ~0.5% relative (step max|x|/127, max ~3 sigma); 5% is a loose bound that no fp32 bug meets.
REL_BOUND = 0.05


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 32)).eval()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


def w8a8_reference(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """Symmetric int8 per row (scale = max|row| / 127.5, as torchao), integer matmul in float64."""
    def q(t):
        s = (t.abs().amax(1, keepdim=True) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
        return torch.clamp(torch.round(t * (1.0 / s)), -128, 127).double(), s.double()
    xq, xs = q(x)
    wq, ws = q(lin.weight.detach())
    return ((xq @ wq.t()) * xs * ws.t() + lin.bias.detach().double()).float()


def test_torchao_weights_are_int8_and_match_exact_w8a8():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    lin = nn.Linear(64, 32)
    x = torch.randn(16, 64) * 3
    ref = w8a8_reference(x, lin)
    quantize_(lin, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))   # what backend "torchao" runs
    assert lin.weight.qdata.dtype == torch.int8 and lin.weight.qdata.shape == (32, 64)
    with torch.no_grad():
        assert rel_err(lin(x), ref) < 1e-5


def test_torch_ao_backend_holds_qint8_and_is_close_to_fp32():
    model, x = mlp(), torch.randn(16, 64)
    q = lowp.to_int8(model, "torch.ao", (x,))
    assert set(lowp.int8_weights(q)) == {"0.weight", "2.weight", "4.weight"}
    assert lowp.int8_weights(model) == {}                      # the caller's model is untouched
    with torch.no_grad():
        err = rel_err(q(x), model(x))
    assert 1e-4 < err < REL_BOUND                              # really rounded, and not broken


def test_ort_backend_holds_int8_initializers_and_is_close_to_fp32():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, x = mlp(), torch.randn(16, 64)
    q = lowp.to_int8(model, "ort", (x,))
    assert sorted(lowp.int8_weights(q).values()) == [(64, 128), (128, 32), (128, 128)]
    with torch.no_grad():
        ref = model(x)
        assert 1e-4 < rel_err(q(x), ref) < REL_BOUND
        assert q(x[:5]).shape == (5, 32)                       # dynamic batch dimension
        assert rel_err(lowp.to_fp32(model, "ort", (x,))(x), ref) < 1e-5


def test_unknown_backend_and_runtime_are_kiln_errors():
    with pytest.raises(KilnError, match="unknown int8 backend 'tensorrt'; known: ort, torch.ao, torchao"):
        lowp.to_int8(mlp(), "tensorrt", (torch.randn(2, 64),))
    with pytest.raises(KilnError, match="unknown fp32 runtime"):
        lowp.to_fp32(mlp(), "tvm", (torch.randn(2, 64),))


def test_missing_torchao_is_one_line_kiln_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)          # import torchao now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(KilnError, match=r"^torchao: torchao is not installed") as exc:
        lowp.to_int8(mlp(), "torchao", (torch.randn(2, 64),))
    assert "\n" not in str(exc.value)


class NotExportable(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x * 3                 # a branch on data: torch.export refuses it


def test_failed_export_is_kiln_error_naming_backend():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    with pytest.raises(KilnError, match=r"^ort: torch.onnx.export failed: .*data-dependent") as exc:
        lowp.to_int8(NotExportable(), "ort", (torch.randn(2, 4),))
    assert "\x1b" not in str(exc.value)


def test_import_is_light():
    code = ("import sys, kiln.quant.lowp; "
            "print([m for m in ('torchao', 'onnxruntime', 'onnx', 'onnxscript') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_torchao_backend_runs_onednn_int8_kernels():
    pytest.importorskip("torchao")
    from torch._dynamo.utils import counters

    model, x = mlp(), torch.randn(16, 64)
    counters.clear()
    q = lowp.to_int8(model, "torchao", (x,))
    # freezing let inductor rewrite every int8 matmul into oneDNN's qlinear on a prepacked weight
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] == 3
    assert set(lowp.int8_weights(q)) == {"module.0.weight", "module.2.weight", "module.4.weight"}
    with torch.no_grad():
        ref = model(x)
        y = q(x)
        eager_int8 = q.module(x)                               # the same int8 model, not compiled
    assert 1e-4 < rel_err(y, ref) < REL_BOUND
    assert rel_err(y, eager_int8) < 1e-3                       # compiling changed kernels, not the maths


def test_config_is_validated():
    with pytest.raises(KilnError, match="threads must be >= 1"):
        lowp.LowpConfig("ort", threads=0)
    with pytest.raises(KilnError, match="only for backend torchao"):
        lowp.LowpConfig("torch.ao", smoothquant_alpha=0.5)
    with pytest.raises(KilnError, match=r"in \(0, 1\]"):
        lowp.LowpConfig("torchao", smoothquant_alpha=1.5)
    with pytest.raises(KilnError, match="needs calibration batches"):
        lowp.to_int8(mlp(), lowp.LowpConfig("torchao", smoothquant_alpha=0.5), (torch.randn(2, 64),))


@pytest.mark.slow
def test_smoothquant_tames_an_outlier_channel():
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    gain = torch.ones(64)
    gain[3] = 60.0                                             # one input channel 60x the others (LLM-style outlier)

    def batch():
        return (torch.randn(32, 64) * gain,)
    x = batch()
    plain = lowp.to_int8(model, "torchao", x)
    smooth = lowp.to_int8(model, lowp.LowpConfig("torchao", smoothquant_alpha=0.5), x,
                          calibration=[batch() for _ in range(4)])
    with torch.no_grad():
        ref = model(*x)
        e_plain, e_smooth = rel_err(plain(*x), ref), rel_err(smooth(*x), ref)
    assert e_smooth < 0.7 * e_plain and e_smooth < REL_BOUND     # measured: 0.009 vs 0.016

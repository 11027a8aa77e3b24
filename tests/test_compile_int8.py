"""kiln.compile.int8: real int8 Linears, for float models and for models kiln quantized.

Oracles: an exact integer re-computation of W8A8 (per-token activations, per-channel weights);
kiln's fake-quantized model (a lowered layer computes the same integers times the same scales,
so it agrees to float rounding, or within one rounding step where torchao's per-token grid is
max|x|/127.5 and kiln's max|x|/127); the weights' storage dtype; inductor's count of oneDNN
int8 linears."""
import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from kiln.compile.backends import Precision, build, parse_backend
from kiln.compile.int8 import ORT_QDQ, TORCHAO, build_torchao, int8_weights, lower_int8, plan_int8
from kiln.compile.runtime import Example
from kiln.compile.verify import relative_error
from kiln.errors import KilnError
from kiln.models.loaded import LoadedModel
from kiln.quant.config import parse_config
from kiln.quant.run import prepare

# Two int8 roundings (activation, weight) of Gaussian data, per row, over <= 3 layers: each is
# ~0.5% relative (step max|x|/127, max ~3 sigma); 5% is a loose bound that no fp32 bug meets.
REL_BOUND = 0.05
W8A8 = {"weight": {"format": "int", "bits": 8, "granularity": "channel"},
        "input": {"format": "int", "bits": 8, "granularity": "tensor"}}
W8A8_TOKEN = {"weight": {"format": "int", "bits": 8, "granularity": "channel"},
              "input": {"format": "int", "bits": 8, "granularity": "token"}}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 32)).eval()


def quantized(model: nn.Module, table: dict, batches: int = 4) -> nn.Module:
    """What `kiln quantize` makes of `model` with `table`, calibrated on random batches."""
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 5, model[0].in_features, generator=gen) for _ in range(batches)]
    prepare(model, parse_config(table), data, forward=lambda m, b: m(b))
    return model.eval()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


def loaded(model: nn.Module, x: torch.Tensor) -> LoadedModel:
    return LoadedModel("test:mlp", model, (x,))


def w8a8_reference(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """Symmetric int8 per row (scale = max|row| / 127.5, as torchao), integer matmul in float64."""
    def q(t):
        s = (t.abs().amax(1, keepdim=True) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
        return torch.clamp(torch.round(t * (1.0 / s)), -128, 127).double(), s.double()
    xq, xs = q(x)
    wq, ws = q(lin.weight.detach())
    return ((xq @ wq.t()) * xs * ws.t() + lin.bias.detach().double()).float()


# ------------------------------------------------------------------ a float model

def test_float_linears_are_int8_and_match_exact_w8a8():
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 32)), torch.randn(16, 64) * 3
    ref = w8a8_reference(x, model[0])
    low = lower_int8(copy.deepcopy(model), Example((x,)))      # what backend torchao compiles
    assert low[0].weight.qdata.dtype == torch.int8 and low[0].weight.qdata.shape == (32, 64)
    with torch.no_grad():
        assert rel_err(low(x), ref) < 1e-5


def test_torch_ao_backend_holds_qint8_and_is_close_to_fp32():
    model, x = mlp(), torch.randn(16, 64)
    q = build(parse_backend("torch.ao"), model, loaded(model, x))
    assert set(int8_weights(q)) == {"0.weight", "2.weight", "4.weight"}
    assert int8_weights(model) == {}                           # the caller's model is untouched
    with torch.no_grad():
        err = rel_err(q(x), model(x))
    assert 1e-4 < err < REL_BOUND                              # really rounded, and not broken


def test_ort_int8_holds_int8_initializers_and_is_close_to_fp32():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, x = mlp(), torch.randn(16, 64)
    q = build(parse_backend("onnxruntime:dtype=int8"), model, loaded(model, x))
    assert sorted(int8_weights(q).values()) == [(64, 128), (128, 32), (128, 128)]
    with torch.no_grad():
        ref = model(x)
        assert 1e-4 < rel_err(q(x), ref) < REL_BOUND
        assert q(x[:5]).shape == (5, 32)                       # dynamic batch dimension


def test_missing_torchao_is_one_line_kiln_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)          # import torchao now raises ImportError
    with pytest.raises(KilnError, match=r"^torchao is not installed") as exc:
        build_torchao(mlp(), Example((torch.randn(2, 64),)), {})
    assert "\n" not in str(exc.value)


class NotExportable(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x * 3                 # a branch on data: torch.export refuses it


def test_failed_export_is_kiln_error_naming_backend():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    m = NotExportable()
    with pytest.raises(KilnError, match=r"^onnxruntime:dtype=int8: torch.onnx.export failed: .*data-dependent") as exc:
        build(parse_backend("onnxruntime:dtype=int8"), m, loaded(m, torch.randn(2, 4)))
    assert "\x1b" not in str(exc.value)


def test_import_is_light():
    code = ("import sys, kiln.compile.backends; "
            "print([m for m in ('torchao', 'onnxruntime', 'onnx', 'onnxscript') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ a model kiln quantized

def test_a_calibrated_quantizer_is_a_constant_in_the_exported_graph():
    model = quantized(mlp(), W8A8)
    x = torch.randn(3, 64)
    program = torch.export.export(model, (x,), strict=False)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("item" in t for t in targets)              # no branch on the ready flag
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x))
    fresh = copy.deepcopy(model)
    for q in fresh.modules():
        if hasattr(q, "calibrated"):
            q.calibrated = False
    fresh.load_state_dict(model.state_dict())                 # what reloading a run does
    assert all(q.calibrated for q in fresh.modules() if hasattr(q, "calibrated") and hasattr(q, "ready"))


@pytest.mark.parametrize("weight_scales", ["channel", "tensor"])
def test_static_w8a8_lowers_to_exactly_the_fake_quantized_model(weight_scales):
    pytest.importorskip("torchao")
    model = quantized(mlp(), {**W8A8, "weight": {**W8A8["weight"], "granularity": weight_scales}})
    x = torch.randn(8, 5, 64) * 4          # well beyond the calibrated range: kiln's grid saturates at -127
    low = lower_int8(copy.deepcopy(model), Example((x,)))
    assert set(int8_weights(low)) == {"0.1.weight", "2.1.weight", "4.1.weight"}
    with torch.no_grad():
        assert relative_error(low(x), model(x)) < 1e-5


def test_int4_weights_with_int8_inputs_run_on_the_int8_kernel_exactly():
    pytest.importorskip("torchao")
    table = {**W8A8, "weight": {"format": "int", "bits": 4, "granularity": "channel"}}
    model = quantized(mlp(), table)
    x = torch.randn(8, 5, 64)
    low = lower_int8(copy.deepcopy(model), Example((x,)))
    assert low[0][1].weight.qdata.abs().max() <= 7             # int4's narrow range, stored as int8
    with torch.no_grad():
        assert relative_error(low(x), model(x)) < 1e-5


def test_per_token_inputs_agree_within_one_rounding_step():
    """kiln's step is max|row|/127 and torchao's max|row|/127.5: each rounded input is within
    one kiln step of the other, so |y - y_fake| <= step(row) * sum_k |w_fake[j, k]|."""
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = quantized(nn.Sequential(nn.Linear(64, 32)), W8A8_TOKEN)
    x = torch.randn(16, 64)
    low = lower_int8(copy.deepcopy(model), Example((x,)))
    with torch.no_grad():
        diff = (low(x) - model(x)).abs()
        w_fake = model[0].quantized_weight()
    bound = (x.abs().amax(1, keepdim=True) / 127) * w_fake.abs().sum(1) + 1e-5
    assert (diff <= bound).all() and diff.max() > 0


@pytest.mark.parametrize("target", [TORCHAO, ORT_QDQ], ids=lambda t: t.name)
def test_smoothquant_input_scale_comes_along(target):
    pytest.importorskip("torchao")
    from kiln.quant.smoothquant import SmoothedLinear

    model = mlp()
    model[2] = SmoothedLinear(model[2], torch.linspace(0.5, 2.0, 128))
    model = quantized(model, W8A8)
    x = torch.randn(8, 5, 64) * 4
    low = lower_int8(copy.deepcopy(model), Example((x,)), target)     # QDQ runs in torch as well
    with torch.no_grad():
        assert relative_error(low(x), model(x)) < 1e-5


def test_other_formats_stay_fake_quantized_and_say_why():
    table = {**W8A8, "rules": [{"match": "fqn:0", "weight": {"format": "int", "bits": 8, "granularity": "group",
                                                         "group_size": 32}},
                               {"match": "fqn:2", "weight": "mxfp4"}]}
    model = quantized(mlp(), table)
    plan = plan_int8(model)
    assert plan.int8 == ("4",)
    assert dict(plan.fake) == {"0": "weight int8 group: no int8 kernel",
                               "2": "weight mxfp4_e2m1 channel: no int8 kernel"}
    assert plan.describe() == ("real int8 kernels: 4; fake quantization: 0 (weight int8 group: no int8 kernel); "
                               "2 (weight mxfp4_e2m1 channel: no int8 kernel)")
    only_fake = quantized(mlp(), {"weight": "mxfp4", "input": "int8"})
    with pytest.raises(KilnError, match="no quantized layer has a format an int8 kernel runs"):
        lower_int8(only_fake, Example((torch.randn(2, 64),)))


def test_layer_names_fold_their_indices():
    from kiln.compile.int8 import Int8Plan

    plan = Int8Plan(("enc.layer.0.q", "enc.layer.1.q", "enc.layer.0.k", "head"), (("enc.layer.0.attn", "x"),))
    assert plan.describe() == "real int8 kernels: enc.layer.*.q (x2), enc.layer.0.k, head; fake quantization: " \
                              "enc.layer.0.attn (x)"


def test_ort_qdq_runs_kiln_scales_on_integer_matmuls(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx
    import onnxruntime as ort

    model, x = quantized(mlp(), W8A8), torch.randn(8, 64) * 4
    q = build(parse_backend("onnxruntime:dtype=int8"), model, loaded(model, x))
    assert sorted(int8_weights(q).values()) == [(64, 128), (128, 32), (128, 128)]   # kiln's integers, (in, out)
    with torch.no_grad():
        assert relative_error(q(x), model(x)) < 1e-5
    # what ONNX Runtime makes of the QDQ pairs: integer matmuls, no float MatMul left
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(q.onnx_bytes, opts, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(q.disabled_optimizers))   # the session q runs
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 3 and "MatMul" not in ops


def test_ort_qdq_leaves_per_token_inputs_fake_quantized():
    model = quantized(mlp(), {**W8A8, "rules": [{"match": "fqn:2", "input": {"format": "int", "bits": 8,
                                                                            "granularity": "token"}}]})
    plan = plan_int8(model, ORT_QDQ)
    assert plan.int8 == ("0", "4") and dict(plan.fake) == {"2": "input int8 token dynamic: no int8 kernel"}
    assert plan_int8(model).int8 == ("0", "2", "4")           # torchao's kernels take per-token scales


def test_peers_with_their_own_scales_refuse_a_quantized_model():
    model, x = quantized(mlp(), W8A8), torch.randn(4, 64)
    with pytest.raises(KilnError, match="^torch.ao: runs its own dynamic quantization, not kiln's"):
        build(parse_backend("torch.ao"), model, loaded(model, x))


@pytest.mark.slow
def test_torchao_backend_runs_onednn_int8_kernels():
    pytest.importorskip("torchao")
    from torch._dynamo.utils import counters

    for model in (mlp(), quantized(mlp(), W8A8)):
        x = torch.randn(16, 64)
        counters.clear()
        q = build(parse_backend("torchao"), model, loaded(model, x))
        # every int8 matmul leaves inductor as one int8 kernel call: freezing rewrites it into oneDNN's
        # qlinear on a prepacked weight (seen on Intel hosts), or it stays one extern int8 matmul (on
        # this project's AMD EPYC host the prepack matcher does not fire; the 3 calls remain)
        inductor = counters["inductor"]
        assert inductor["qlinear_weight_prepack_matcher_count"] == 3 or inductor["extern_calls"] == 3
        assert len(int8_weights(q)) == 3
        with torch.no_grad():
            ref, y, eager_int8 = model(x), q(x), q.module(x)   # q.module: the same int8 model, not compiled
        assert rel_err(y, eager_int8) < 1e-3                   # compiling changed kernels, not the maths
        assert rel_err(y, ref) < (1e-5 if model[0].__class__.__name__ == "QuantOp" else REL_BOUND)


@pytest.mark.slow
def test_quantize_then_compile_int8_then_reload(tmp_path):
    """The CLI's chain on zoo:mlp: kiln quantize, compile --precision int8, load_compiled (what
    kiln bench runs): torchao runs every layer on int8 kernels, as the fake-quantized model."""
    pytest.importorskip("torchao")
    from kiln.compile.run import CompileConfig, compile_run, load_compiled
    from kiln.quant.run import quantize_run

    w8a8 = parse_config({"weight": {"format": "int", "bits": 8, "granularity": "channel"},
                         "input": {"format": "int", "bits": 8, "granularity": "tensor"}})
    quantize_run("zoo:mlp", w8a8, tmp_path / "q", calib_batches=2, evaluate=False)
    config = CompileConfig("eager+torchao", batch=4, precision=Precision.INT8, rounds=2)
    report, sel = compile_run(str(tmp_path / "q"), config, out=tmp_path / "c")
    assert report["quantized"]["backends"] == {"torchao": {"int8": ["layers.0", "layers.2", "head"], "fake": []}}
    assert report["quantized"]["lines"] == ["torchao: real int8 kernels: layers.* (x2), head; fake quantization: none"]
    assert sel.by_name("torchao").status == "ok" and sel.by_name("torchao").error < 1e-5
    fn, inputs, meta, source = load_compiled(tmp_path / "c")
    if meta["backend"] == "torchao":
        assert len(int8_weights(fn)) == 3
    x = inputs.example_inputs[0]
    with torch.no_grad():
        assert relative_error(fn(x), source.model(x)) < 1e-5

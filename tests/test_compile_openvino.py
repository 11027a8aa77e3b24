"""OpenVINO as a kiln compile backend: fp32 and NNCF int8.

Oracles: eager PyTorch outputs (fp32 within TOLERANCE[FP32]), the test-split accuracy and
argmax agreement of a model trained here on real MNIST digits (int8), OpenVINO's own graph
(FakeQuantize nodes) and its CPU plugin's runtime model (the precision each layer ran in)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch import nn

pytest.importorskip("openvino")

from kiln.compile.auto import AUTO, at_batch  # noqa: E402
from kiln.compile.backends import TOLERANCE, Precision, build, parse_backend, precision_of  # noqa: E402
from kiln.compile.openvino import int8_ops, load_ir  # noqa: E402
from kiln.compile.verify import relative_error  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.models.loaded import LoadedModel  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def _tiny() -> LoadedModel:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    return LoadedModel("test:tiny", model, (torch.randn(1, 1, 8, 8),))


def _runtime_precisions(fn, x) -> Counter:
    """(layer type, precision it ran in) counted over the CPU plugin's compiled graph."""
    rt = fn.compiled_for([x.numpy()]).get_runtime_model()
    return Counter((op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
                   for op in rt.get_ordered_ops())


def test_names_options_and_the_bare_dtype():
    assert parse_backend("openvino:int8") == parse_backend("openvino:dtype=int8")
    assert parse_backend("openvino:int8").label == "openvino:dtype=int8"
    assert precision_of(parse_backend("openvino:int8")) is Precision.INT8
    assert precision_of(parse_backend("openvino")) is Precision.FP32
    assert parse_backend("onnxruntime:int8").label == "onnxruntime:dtype=int8"
    with pytest.raises(KilnError, match="dtype must be one of fp32, int8, got 'int4'"):
        parse_backend("openvino:dtype=int4")
    with pytest.raises(KilnError, match="unknown option 'int4'"):
        parse_backend("openvino:int4")
    assert "openvino" in AUTO[Precision.FP32] and "openvino:dtype=int8" in AUTO[Precision.INT8]


def test_fp32_matches_eager_at_the_batch_built_and_at_another():
    loaded = at_batch(_tiny(), 4)
    fn = build(parse_backend("openvino"), loaded.model, loaded)
    for batch in (4, 9):                       # the converted graph is shape-generic; each shape compiles once
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            assert relative_error(fn(x), loaded.model(x)) <= TOLERANCE[Precision.FP32]
    assert int8_ops(fn.ov_model) == {"fake_quantize": 0, "int8_constants": 0}
    assert not any(p in ("i8", "u8") for _, p in _runtime_precisions(fn, x))


def test_a_transformer_built_at_batch_1_runs_at_another_batch():
    from kiln.models.spec import load

    # a static program would keep the batch in its attention views' shapes: converted with a dynamic one
    loaded = at_batch(load("zoo:gpt"), 1)
    fn = build(parse_backend("openvino"), loaded.model, loaded)
    for batch in (1, 3):
        idx = loaded.example_inputs[0].repeat(batch, 1)
        with torch.no_grad():
            assert relative_error(fn(idx), loaded.model(idx)) <= TOLERANCE[Precision.FP32]


def test_rebatch_cuts_calibration_into_the_static_batch():
    from kiln.compile.openvino import rebatch
    from kiln.compile.runtime import Example

    parts = [Example((), {"ids": torch.arange(n * 2).view(n, 2) + 100 * n}) for n in (3, 4)]
    out = rebatch(parts, 2)
    assert [e.kwargs["ids"].shape[0] for e in out] == [2, 2, 2]          # 7 samples: 3 batches of 2, 1 dropped
    assert torch.equal(torch.cat([e.kwargs["ids"] for e in out]), torch.cat([p.kwargs["ids"] for p in parts])[:6])


def test_inputs_it_cannot_run_are_one_line():
    loaded = at_batch(_tiny(), 2)
    fn = build(parse_backend("openvino"), loaded.model, loaded)
    with pytest.raises(KilnError, match=r"^OpenVINO cannot run inputs of shapes \[\[2, 8, 8\]\]") as exc:
        fn(torch.randn(2, 8, 8))
    assert "\n" not in str(exc.value)


def _trained_mnist_mlp():
    """zoo:mlp trained for two epochs on the real MNIST digits of kiln's mnist split."""
    from kiln.data import load_dataset
    from kiln.models.spec import load

    splits = load_dataset("mnist", seed=0)
    base = load("zoo:mlp")
    torch.manual_seed(0)
    model = base.model.train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return dataclasses.replace(base, model=model.eval()), splits


def test_int8_holds_int8_runs_int8_kernels_and_keeps_mnist_accuracy():
    from kiln.train.evaluation import calibration_batches

    loaded, splits = _trained_mnist_mlp()
    fn = build(parse_backend("openvino:int8"), loaded.model, loaded, tuple(calibration_batches(splits, 8, 32, seed=0)))
    ops = int8_ops(fn.ov_model)
    assert ops["fake_quantize"] >= 3 and ops["int8_constants"] >= 3          # 3 Linears: inputs and weights
    x = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    y = torch.tensor([int(splits.test[i][1]) for i in range(len(splits.test))])
    ran = _runtime_precisions(fn, x)
    assert sum(n for (kind, p), n in ran.items() if kind == "FullyConnected" and p in ("i8", "u8")) == 3
    with torch.no_grad():
        ref, got = loaded.model(x), fn(x)
    acc_fp32 = (ref.argmax(-1) == y).float().mean().item()
    acc_int8 = (got.argmax(-1) == y).float().mean().item()
    assert acc_fp32 > 0.85                                   # the oracle model learnt the digits
    assert acc_int8 >= acc_fp32 - 0.01                       # at most 1 point lost (500 test digits)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.98
    assert relative_error(got, ref) <= TOLERANCE[Precision.INT8]


def test_compile_writes_the_ir_and_reload_runs_it_bit_exactly(tmp_path, monkeypatch):
    from kiln.compile.run import CompileConfig, compile_run, load_compiled
    from kiln.timing import Measurement

    # eager is always measured beside: let OpenVINO win whatever this busy machine measures
    monkeypatch.setattr(Measurement, "fastest", lambda self: "openvino:dtype=int8")
    report, sel = compile_run("zoo:mlp", CompileConfig("openvino:int8", batch=4, precision=Precision.INT8, rounds=2),
                              out=tmp_path / "c", hardware=None)
    assert sel.chosen == "openvino:dtype=int8"
    assert report["calibration"] == "256 samples of mnist's training split (seed 0)"
    assert (tmp_path / "c" / "model.xml").is_file() and (tmp_path / "c" / "model.bin").stat().st_size > 0
    assert int8_ops(load_ir(tmp_path / "c").ov_model)["fake_quantize"] >= 3
    fn, loaded, meta, source = load_compiled(tmp_path / "c")
    assert meta["backend"] == "openvino:dtype=int8"
    x = torch.randn(7, *loaded.example_inputs[0].shape[1:])
    with torch.no_grad():
        assert torch.equal(fn(x), sel.fns[sel.chosen](x))   # the file runs what was measured
        assert relative_error(fn(x), source.model(x)) <= TOLERANCE[Precision.INT8]


def test_fp32_ir_keeps_fp32_weights(tmp_path):
    loaded = at_batch(_tiny(), 2)
    fn = build(parse_backend("openvino"), loaded.model, loaded)
    fn.save(tmp_path)
    again = load_ir(tmp_path)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(x), fn(x))                  # not halved to fp16 on the way


def test_unreadable_ir_and_missing_ir_are_one_line(tmp_path):
    from kiln.compile.run import COMPILE_FILE, load_compiled

    (tmp_path / "model.xml").write_text("<net>not an IR")
    with pytest.raises(KilnError, match="not a readable OpenVINO IR") as exc:
        load_ir(tmp_path)
    assert "\n" not in str(exc.value)
    d = tmp_path / "c"
    d.mkdir()
    (d / COMPILE_FILE).write_text(json.dumps({"src": "zoo:mlp", "backend": "openvino", "batch": 1}))
    with pytest.raises(KilnError, match="has no model.xml"):
        load_compiled(d)


class _Grid(nn.Identity):
    def integer_grid(self):                                    # what marks a kiln quantizer
        return (-128, 127)


def test_int8_refuses_a_kiln_quantized_model_whose_scales_it_would_replace():
    loaded = _tiny()
    loaded.model.append(_Grid())
    with pytest.raises(KilnError, match="^openvino:dtype=int8: NNCF quantizes with its own scales, not kiln's"):
        build(parse_backend("openvino:int8"), loaded.model, loaded)
    fn = build(parse_backend("openvino"), loaded.model, loaded)  # fp32 runs it as it is
    x = loaded.example_inputs[0]
    with torch.no_grad():
        assert relative_error(fn(x), loaded.model(x)) <= TOLERANCE[Precision.FP32]


def test_cli_bad_dtype_is_one_line_exit_2_and_writes_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kiln.cli.main", "compile", "zoo:mlp", "--backend", "openvino:int4",
                        "--out", str(tmp_path / "c")], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "unknown option 'int4'" in lines[0]
    assert not (tmp_path / "c").exists()


def test_import_stays_light():
    code = "import sys, kiln.compile.run; print([m for m in ('openvino', 'nncf') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_at_compiled_batch_pads_and_splits_to_the_compiled_shape():
    from kiln.compile.run import AtCompiledBatch

    seen = []
    w = torch.randn(5, 3)

    def fn(x):
        seen.append(x.shape[0])
        return x @ w
    x = torch.randn(11, 5)
    assert torch.equal(AtCompiledBatch(fn, 4)(x), x @ w)
    assert seen == [4, 4, 4]                                   # 4 + 4 + 3 padded to 4
    # a dict batch comes as keywords (kiln.train.tasks.forward calls model(**x))
    assert torch.equal(AtCompiledBatch(lambda ids: ids @ w, 4)(ids=x), x @ w)


def test_eval_of_a_compile_dir_runs_its_backend_on_the_test_split(tmp_path, monkeypatch):
    from kiln.compile.run import CompileConfig, compile_run, evaluate_compiled
    from kiln.timing import Measurement

    monkeypatch.setattr(Measurement, "fastest", lambda self: "openvino")
    compile_run("zoo:mlp", CompileConfig("openvino", batch=4, rounds=1), out=tmp_path / "c")
    r = evaluate_compiled(tmp_path / "c")
    assert r["backend"] == "openvino" and r["metric"] == "accuracy" and r["dataset"] == "mnist"
    assert r["value"] == r["eager"]                            # fp32 within 1e-4: the same argmax on 500 digits
    out = subprocess.run([sys.executable, "-m", "kiln.cli.main", "eval", str(tmp_path / "c")], capture_output=True,
                         text=True)
    assert out.returncode == 0 and f"accuracy {r['value']:.6f} on openvino, eager {r['eager']:.6f}" in out.stdout

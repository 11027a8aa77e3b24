"""Backends, their choice by measurement, and MLPerf LoadGen.

Oracles: eager PyTorch outputs, the minimum of the reported latencies,
and the accuracy computed directly on the same samples."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from kiln.compile import auto
from kiln.compile.auto import at_batch, select
from kiln.compile.backends import BACKENDS, Backend, Precision, build, parse_backend
from kiln.errors import KilnError
from kiln.models.loaded import LoadedModel


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def _tiny() -> LoadedModel:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    return LoadedModel("test:tiny", model, (torch.randn(1, 1, 8, 8),))


if "test-doubled" not in BACKENDS:
    BACKENDS.register("test-doubled")(Backend(build=lambda m, ex, o: (lambda *a, **k: m(*a, **k) * 2), options={}))


def test_backend_names_and_options_are_checked():
    assert parse_backend("inductor:mode=default,freezing=1").label == "inductor:freezing=1,mode=default"
    with pytest.raises(KilnError, match="unknown backend 'tvm'"):
        parse_backend("tvm")
    with pytest.raises(KilnError, match="unknown option 'speed=9'"):
        parse_backend("eager:speed=9")
    with pytest.raises(KilnError, match="level must be one of basic, extended, all"):
        parse_backend("onnxruntime:level=max")
    with pytest.raises(KilnError, match="threads must be a positive integer"):
        parse_backend("onnxruntime:threads=0")


@pytest.mark.parametrize("name", ["eager", "export", "eager:passes=1", "onnxruntime", "onnxruntime:level=basic"])
def test_each_backend_matches_eager(name):
    loaded = at_batch(_tiny(), 4)
    fn = build(parse_backend(name), loaded.model, loaded)
    x = loaded.example_inputs[0]
    with torch.no_grad():
        assert torch.allclose(fn(x), loaded.model(x), rtol=1e-5, atol=1e-5)


def test_select_keeps_the_fastest_accepted_and_says_why_others_were_not():
    loaded = at_batch(_tiny(), 4)
    sel = select(loaded.model, loaded, ["eager", "export", "test-doubled", "torchao"], Precision.FP32, rounds=5)
    by = {c.backend: c for c in sel.candidates}
    assert by["test-doubled"].status == "rejected" and "differ from eager by 1.00e+00" in by["test-doubled"].reason
    assert by["torchao"].status == "rejected" and "int8 is below the allowed precision" in by["torchao"].reason
    ok = [c for c in sel.candidates if c.status == "ok"]
    assert {c.backend for c in ok} == {"eager", "export"}
    assert sel.chosen == min(ok, key=lambda c: c.latency_s).backend
    assert all(len(c.times) == (sel.rounds if c.final else 5) and c.throughput == 4 / c.latency_s for c in ok)
    assert sel.rounds == (10 if sel.runoff else 5)


def test_a_close_final_round_doubles_the_rounds_of_every_finalist(monkeypatch):
    monkeypatch.setattr(auto, "RUNOFF_MARGIN", 100.0)      # every pair is "close"
    monkeypatch.setattr(auto, "FINALIST_MARGIN", 100.0)    # every candidate is a finalist
    loaded = at_batch(_tiny(), 4)
    sel = select(loaded.model, loaded, ["eager", "export", "eager:passes=1"], Precision.FP32, rounds=4)
    ok = [c for c in sel.candidates if c.status == "ok"]
    assert [len(c.times) for c in ok] == [8, 8, 8] and sel.rounds == 8 and len(sel.runoff) == 2
    assert all(c.final for c in ok) and set(sel.final.timings) == {c.backend for c in ok}
    assert sel.to_dict()["runoff"] == sel.runoff and sel.to_dict()["rounds"] == 8
    assert all(c.latency_s == float(np.median(c.times)) for c in ok)      # on all the final rounds
    assert sel.chosen == min(ok, key=lambda c: c.latency_s).backend
    monkeypatch.setattr(auto, "RUNOFF_MARGIN", 0.0)        # no runoff
    assert select(loaded.model, loaded, ["eager", "export"], Precision.FP32, rounds=2).runoff == []


def test_nothing_within_tolerance_is_one_error():
    loaded = _tiny()
    with pytest.raises(KilnError, match="no backend could run test:tiny within tolerance"):
        select(loaded.model, loaded, ["test-doubled"], rounds=1)


def test_at_batch_grows_batched_inputs_and_refuses_graphs():
    from kiln.models.spec import load

    mini = at_batch(load("zoo:minilm_cls").__class__("x", nn.Identity(), (),
                                                     {"ids": torch.tensor([[5, 6, 7]]), "mask": torch.ones(1, 3)}), 3)
    assert mini.example_kwargs["ids"].tolist() == [[5, 6, 7]] * 3 and mini.example_kwargs["mask"].shape == (3, 3)
    gcn = load("zoo:gcn")
    assert at_batch(gcn, 1) is gcn
    with pytest.raises(KilnError, match="no batch dimension"):
        at_batch(gcn, 8)


def test_compile_run_writes_the_choice_and_reloads_it(tmp_path):
    from kiln.compile.run import CompileConfig, compile_run, load_compiled

    report, sel = compile_run("zoo:mlp", CompileConfig("eager+onnxruntime", batch=4, rounds=3), out=tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "compile.json").read_text())
    assert meta["backend"] == sel.chosen and meta["batch"] == 4
    assert {c["backend"] for c in report["candidates"]} == {"eager", "onnxruntime"}
    assert report["roofline"] == {"note": "no hardware profile"}
    if sel.chosen == "onnxruntime":
        assert (tmp_path / "c" / "model.onnx").stat().st_size > 0
    fn, loaded, _, source = load_compiled(tmp_path / "c")
    x = loaded.example_inputs[0]
    with torch.no_grad():
        assert torch.allclose(fn(x), source.model(x), atol=1e-5)


def test_cli_bad_backend_is_one_line_and_writes_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kiln.cli.main", "compile", "zoo:mlp", "--backend", "eager+tvm",
                        "--out", str(tmp_path / "c")], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1
    assert lines[0] == ("kiln: error: unknown backend 'tvm'; known: eager, export, inductor, onnxruntime, openvino, "
                        "torch.ao, torchao")
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------- LoadGen

def test_settings_a_scenario_does_not_allow_are_refused():
    from kiln.bench.loadgen import BenchConfig, Scenario

    with pytest.raises(KilnError, match="--target-qps is a Server setting; the Offline scenario does not allow it"):
        BenchConfig(Scenario.OFFLINE, target_qps=10)
    with pytest.raises(KilnError, match="--batch is for Offline and Server"):
        BenchConfig(Scenario.SINGLE_STREAM, batch=4)
    with pytest.raises(KilnError, match="Server scenario needs --target-qps"):
        BenchConfig(Scenario.SERVER)


def _mnist_model():
    from kiln.models.spec import load

    torch.manual_seed(0)
    return load("zoo:mlp").model.eval()


@pytest.mark.parametrize("scenario,kw", [("SingleStream", {}), ("Offline", {"batch": 16}),
                                         ("MultiStream", {"samples_per_query": 4}), ("Server", {"target_qps": 100})])
def test_loadgen_runs_each_scenario(scenario, kw):
    from kiln.bench.loadgen import BenchConfig, Scenario, dataset_samples, run_loadgen

    samples = dataset_samples("mnist", 64)
    r = run_loadgen(_mnist_model(), samples, BenchConfig(Scenario(scenario), min_duration_s=0.3, **kw))
    assert r["effective_scenario"] == scenario and r["num_errors"] == 0
    assert r["result_min_latency_ns"] <= r["result_90.00_percentile_latency_ns"] <= r["result_max_latency_ns"]
    assert isinstance(r["valid"], bool)


def test_loadgen_accuracy_mode_equals_direct_evaluation():
    from kiln.bench.loadgen import BenchConfig, Mode, Scenario, dataset_samples, run_loadgen

    samples = dataset_samples("mnist", 100)
    model = _mnist_model()
    with torch.no_grad():
        direct = (model(torch.stack(samples.inputs)).argmax(-1) == torch.tensor(samples.labels)).float().mean().item()
    r = run_loadgen(model, samples, BenchConfig(Scenario.OFFLINE, Mode.ACCURACY, batch=32, min_duration_s=0.1))
    assert r["accuracy_samples"] == 100 and r["accuracy"] == pytest.approx(direct)


def test_bench_cli_on_a_compile_dir(tmp_path):
    from kiln.compile.run import CompileConfig, compile_run

    compile_run("zoo:mlp", CompileConfig("eager", batch=1, rounds=2), out=tmp_path / "c")
    r = subprocess.run([sys.executable, "-m", "kiln.cli.main", "bench", str(tmp_path / "c"), "--scenario", "SingleStream",
                        "--min-duration", "0.3", "--hardware", "a100", "--json", str(tmp_path / "b.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "b.json").read_text())
    assert out["backend"] == "eager" and out["scenario"] == "SingleStream" and out["model_batch"] == 1
    assert out["roofline_fraction"] == pytest.approx(out["roofline"]["roofline_s"] / out["per_call_s"])
    bad = subprocess.run([sys.executable, "-m", "kiln.cli.main", "bench", "zoo:mlp", "--scenario", "Offline",
                          "--target-qps", "5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Server setting" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["inductor", "inductor:freezing=1", "inductor:freezing=1,passes=1",
                                  "inductor:dtype=bf16,freezing=1"])
def test_inductor_backends_match_eager_within_their_precision(name):
    from kiln.compile.backends import TOLERANCE, precision_of
    from kiln.compile.verify import relative_error

    loaded = at_batch(_tiny(), 4)
    spec = parse_backend(name)
    fn = build(spec, loaded.model, loaded)
    x = loaded.example_inputs[0]
    with torch.no_grad():
        assert relative_error(fn(x), loaded.model(x)) <= TOLERANCE[precision_of(spec)]

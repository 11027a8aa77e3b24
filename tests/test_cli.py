"""The kiln command: tables, documented JSON, and the bad-input contract (one line, exit 2,
no traceback, no output files)."""
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kiln.cli.main import app
from kiln.hardware.profiles import HardwareProfile, save_profile

runner = CliRunner()
NODE_KEYS = {"name", "op", "module", "shape", "flops", "bytes"}
TOP_KEYS = {"model", "params", "flops", "macs", "param_bytes", "peak_activation_bytes", "nodes", "roofline"}


@pytest.fixture(autouse=True)
def local_profile():
    # a fixed 'local' profile: tests must not spend seconds calibrating
    save_profile(HardwareProfile("local", "test cpu", "cpu", {"fp32": 2e11}, 2e10,
                                 sources={"fp32": "measured by `kiln hardware calibrate` (test)"}))


def test_analyze_writes_the_documented_json_and_svg(tmp_path):
    out, svg = tmp_path / "a.json", tmp_path / "g.svg"
    result = runner.invoke(app, ["analyze", "zoo:resnet20", "--json", str(out), "--svg", str(svg), "--depth", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert TOP_KEYS <= set(data)
    assert all(NODE_KEYS <= set(n) for n in data["nodes"])
    assert data["flops"] == sum(n["flops"] for n in data["nodes"]) == 2 * data["macs"]
    assert data["params"] == 272_474
    assert {"hardware", "latency_s", "bound"} <= set(data["roofline"])
    assert data["roofline"]["latency_s"] == pytest.approx(sum(n["roofline_s"] for n in data["nodes"]))
    assert sum(m["params"] for m in data["modules"]) == data["params"]
    assert all(n["measured_s"] is not None and n["measured_s"] >= 0 for n in data["nodes"])
    assert svg.read_text().lstrip().startswith(("<svg", "<?xml"))
    assert "per module (depth 1)" in result.output and "stages" in result.output


def test_models_and_hardware_list_as_json(tmp_path):
    out = tmp_path / "models.json"
    result = runner.invoke(app, ["models", "--json", str(out)])
    assert result.exit_code == 0, result.output
    models = {m["name"]: m for m in json.loads(out.read_text())["models"]}
    assert {"mlp", "resnet20", "minilm"} <= set(models)
    assert models["minilm"]["family"] == "transformer" and models["minilm"]["params"] == 22_713_216
    assert models["resnet20"]["default_input"].startswith("1x3x32x32")
    hw = tmp_path / "hw.json"
    assert runner.invoke(app, ["hardware", "--json", str(hw)]).exit_code == 0
    names = {p["name"] for p in json.loads(hw.read_text())["profiles"]}
    assert {"a100", "h100", "tpu-v4", "rpi4", "alveo-u250", "local"} <= names


BAD = [
    (["analyze", "zoo:nope"], "unknown zoo model 'nope'"),
    (["analyze", "hf:/no/such/dir"], "does not exist"),
    (["analyze", "hf-config:bert?bogus_key=1"], "bogus_key"),
    (["analyze", "hf-config:nomodel"], "unknown model type"),
    (["analyze", "zoo:mlp", "--input-shape", "2x3"], "rejected its inputs"),
    (["analyze", "zoo:mlp", "--hardware", "tpu-v9"], "unknown hardware profile 'tpu-v9'"),
    (["analyze", "zoo:mlp", "--color-by", "mood"], "expected bound or cost"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[b[1] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_leaves_no_files(tmp_path, argv, message):
    out, svg = tmp_path / "out.json", tmp_path / "out.svg"
    result = runner.invoke(app, [*argv, "--json", str(out), "--svg", str(svg)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert list(tmp_path.iterdir()) == []


def test_real_process_exit_code_and_stderr(tmp_path):
    """The installed entry point, not the test runner: exit 2 and a single stderr line."""
    proc = subprocess.run([sys.executable, "-m", "kiln.cli.main", "analyze", "py:nope.py:f"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "kiln: error: py:nope.py:f: file nope.py does not exist"


def test_unwritable_output_fails_before_any_work(tmp_path):
    result = runner.invoke(app, ["analyze", "zoo:mlp", "--json", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.stderr
    assert list(tmp_path.iterdir()) == []


def _eager_accuracy(spec: str, dataset: str, n: int) -> float:
    import torch

    from kiln.data import load_dataset
    from kiln.models.spec import load

    test = load_dataset(dataset).test
    model = load(spec).model.eval()
    xs, ys = zip(*(test[i] for i in range(n)))
    with torch.no_grad():
        pred = model(torch.stack(xs)).argmax(-1)
    return (pred == torch.as_tensor(ys)).float().mean().item()


def test_bench_accuracy_mode_reports_the_eager_accuracy_and_keeps_the_json(tmp_path):
    """README's `--mode accuracy` crashed after the run (no roofline fraction); the oracle is
    the eager model's accuracy on the same test samples."""
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "zoo:mlp", "--mode", "accuracy", "--max-samples", "64", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["accuracy_samples"] == 64 and "roofline_fraction" not in data
    assert data["accuracy"] == pytest.approx(_eager_accuracy("zoo:mlp", "mnist", 64))
    assert "accuracy mode is not timed" in result.stdout


def test_bench_server_prints_counts_as_integers_and_json_to_stdout(tmp_path):
    """README's `--scenario Server` crashed the same way; `--json -` puts the JSON alone on
    stdout (the table goes to stderr) and a query count prints as the integer LoadGen counted."""
    result = runner.invoke(app, ["bench", "zoo:mlp", "--scenario", "Server", "--target-qps", "200",
                                 "--min-duration", "0.5", "--max-samples", "32", "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["scenario"] == "Server" and "roofline_fraction" not in data
    queries = int(data["result_query_count"])
    assert queries == data["result_query_count"] > 0
    assert f"{queries:,}" in result.stderr and f"{queries:,}.0" not in result.stderr
    assert "Server latencies include queueing" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["models"], ["datasets"], ["analyze", "zoo:mlp", "--no-measure"]])
def test_json_dash_is_standard_output_with_the_same_content_as_a_file(tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    to_file = runner.invoke(app, [*argv, "--json", "out.json"])
    to_stdout = runner.invoke(app, [*argv, "--json", "-"])
    assert to_file.exit_code == to_stdout.exit_code == 0, to_stdout.output
    same = [{k: v for k, v in json.loads(text).items() if k != "timings_s"}   # wall times differ
            for text in (to_stdout.stdout, (tmp_path / "out.json").read_text())]
    assert same[0] == same[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]   # no file named '-'
    assert to_stdout.stderr.strip() and to_file.stdout.strip()   # the tables went to stderr instead


def test_progress_off_a_terminal_prints_plain_lines_with_elapsed_time_and_eta(capsys, monkeypatch):
    from kiln.cli import common

    now = [100.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: now[0])
    assert not common.err_console.is_terminal   # pytest captures stderr
    with common.progress("bench", every_s=3600, after_s=2) as update:
        now[0] = 103.0
        update("LoadGen", expected_s=30)     # a timed phase: its length is the ETA
        now[0] = 110.0
        update("scoring", fraction=0.5)      # half done after 10 s: 10 s to go
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["kiln: bench: LoadGen (3 s elapsed, ETA 30 s)",
                          "kiln: bench: scoring (10 s elapsed, ETA 10 s)"]


def test_progress_stays_silent_for_a_quick_step(capsys, monkeypatch):
    from kiln.cli import common

    with common.progress("loading", after_s=60) as update:
        update("model")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("exc,line", [
    (PermissionError(13, "Permission denied", "out/metrics.json"), "kiln: error: out/metrics.json: Permission denied"),
    (ValueError("batch_size should be a positive integer value\nmore detail"),
     "kiln: error: batch_size should be a positive integer value"),
])
def test_os_and_value_errors_take_the_one_error_path(capsys, exc, line):
    import typer

    from kiln.cli.common import user_errors

    @user_errors
    def command():
        raise exc

    with pytest.raises(typer.Exit) as info:
        command()
    assert info.value.exit_code == 2
    assert capsys.readouterr().err == line + "\n"


def test_a_dataset_of_another_task_is_refused_for_a_run_of_a_zoo_model_too(tmp_path):
    from kiln.cli.common import check_fits
    from kiln.errors import KilnError
    from kiln.runs.artifact import write_meta

    write_meta(tmp_path, spec="zoo:mlp", dataset="mnist", transforms=[])
    check_fits(str(tmp_path), "digits")   # classification, like the MLP
    with pytest.raises(KilnError, match="dataset rt-lm is for language-modeling"):
        check_fits(str(tmp_path), "rt-lm")
    with pytest.raises(KilnError, match="teacher zoo:gpt does language-modeling"):
        check_fits(str(tmp_path), None, "zoo:gpt")

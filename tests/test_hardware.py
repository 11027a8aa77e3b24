"""Hardware profiles: built-ins cite every figure, user TOML profiles, calibration."""
import json

import pytest
import torch
from typer.testing import CliRunner

from kiln.cli.main import app
from kiln.errors import KilnError
from kiln.hardware.calibrate import Calibration, Peak, calibrate, matmul_peak
from kiln.hardware.profiles import (HardwareProfile, available, higher_in, load_profile, peak_unit, profile_from_toml,
                                    save_profile, user_dir)
from kiln.timing import Timing

BUILTINS = ["a100", "h100", "tpu-v4", "rpi4", "alveo-u250"]


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_profiles_cite_a_source_for_every_figure(name):
    p = load_profile(name)
    assert set(p.peak_flops) | {"memory_bandwidth"} <= set(p.sources)
    assert all(len(s) > 20 for s in p.sources.values())


def test_builtin_figures_are_the_datasheet_numbers():
    assert load_profile("a100").peak_flops["bf16"] == 312e12
    assert load_profile("h100").memory_bandwidth == 3.35e12
    assert load_profile("tpu-v4").peak_flops["bf16"] == 275e12
    assert load_profile("alveo-u250").peak_flops["int8"] == 33.3e12
    # derived: 4 cores x 1.5 GHz x 8 FLOP/cycle
    assert load_profile("rpi4").peak_flops["fp32"] == 4 * 1.5e9 * 8


def test_fallback_dtype_is_used_and_reported():
    peak, key = load_profile("alveo-u250").peak_for("float32")
    assert (peak, key) == (33.3e12, "int8")
    assert load_profile("h100").peak_for("bfloat16") == (989.4e12, "bf16")


def test_calibrate_saves_a_profile_that_reloads_identically():
    cal = calibrate("mybox", size=128, copy_mib=8, budget_s=0.5)
    p = cal.profile
    assert p.peak_flops["fp32"] > 1e8 and p.memory_bandwidth > 1e8
    path = save_profile(p)
    assert path.parent == user_dir()
    again = load_profile("mybox")
    assert again.peak_flops == pytest.approx(p.peak_flops, rel=1e-5)
    assert again.memory_bandwidth == pytest.approx(p.memory_bandwidth, rel=1e-5)
    assert again.measured_here and "mybox" in available()
    assert "int8" not in p.sources or "(OP/s)" in p.sources["int8"]


def test_a_peak_is_the_work_over_the_fastest_call():
    peak = matmul_peak(96, torch.float32, budget_s=0.3)
    assert peak.value == 2 * 96**3 / min(peak.timing.samples)           # oracle: the definition
    assert peak.value >= peak.typical and peak.timing.n >= 10
    made = Peak("fp32", 100.0, Timing("x", (1.0, 2.0, 2.0, 2.0, 4.0), 1), settled=True)
    assert (made.value, made.typical, made.spread) == (100.0, 50.0, 1.0)


def test_calibration_says_when_the_machine_was_busy():
    peaks = {"fp32": Peak("fp32", 100.0, Timing("x", (1.0,) * 10, 2), True),
             "memory_bandwidth": Peak("memory_bandwidth", 10.0, Timing("x", (1.0,) * 10, 2), True)}
    profile = HardwareProfile("p", "", "cpu", {"fp32": 100.0}, 10.0)
    assert Calibration(profile, peaks, 0.0, 0.5, cpus=2, threads=2).warnings() == []
    busy = Calibration(profile, peaks | {"fp32": Peak("fp32", 100.0, Timing("x", (1.0,) + (2.0,) * 9, 2), False)},
                       others_cpu=0.6, load_before=3.5, cpus=2, threads=2).warnings()
    assert busy[0] == "other processes took 60% of 2 CPUs while calibrating"
    assert busy[1] == "load average 3.50 on 2 CPUs before calibrating"
    assert busy[2] == "fp32: best of 10 calls (still improving at the time bound; median call 100% slower)"


def test_int8_peaks_are_operations_and_a_higher_saved_figure_is_kept():
    assert peak_unit("int8") == "OP/s" and peak_unit("fp32") == "FLOP/s"
    old = HardwareProfile("p", "", "cpu", {"fp32": 330e9, "bf16": 100e9}, 20e9)
    new = HardwareProfile("p", "", "cpu", {"fp32": 46.5e9, "bf16": 101e9}, 20.1e9)
    assert higher_in(old, new) == {"fp32": (330e9, 46.5e9)}
    assert higher_in(new, old, tolerance=0.0) == {"bf16": (101e9, 100e9), "memory_bandwidth": (20.1e9, 20e9)}
    assert higher_in(new, old) == {}                # within the default 2%


def test_calibrate_cli_keeps_a_better_saved_profile_unless_forced(tmp_path):
    save_profile(HardwareProfile("box", "", "cpu", {"fp32": 1e18}, 1e18))      # no CPU reaches these
    runner = CliRunner()
    args = ["hardware", "calibrate", "--name", "box", "--size", "64", "--copy-mib", "8", "--budget", "0.2"]
    kept = runner.invoke(app, args + ["--json", str(tmp_path / "k.json")])
    assert kept.exit_code == 0, kept.output
    assert "kept" in kept.output and "--force" in kept.output and load_profile("box").peak_flops["fp32"] == 1e18
    assert json.loads((tmp_path / "k.json").read_text())["saved"] is False
    forced = runner.invoke(app, args + ["--force", "--json", str(tmp_path / "f.json")])
    assert forced.exit_code == 0, forced.output
    data = json.loads((tmp_path / "f.json").read_text())
    assert data["saved"] is True and load_profile("box").peak_flops["fp32"] == pytest.approx(data["peak_flops"]["fp32"], rel=1e-5)


def test_user_toml_profile_and_its_errors(tmp_path):
    good = tmp_path / "edge.toml"
    good.write_text('name = "edge"\nkind = "accelerator"\nmemory_bandwidth = 1e10\n[peak_flops]\nfp32 = 1e12\n')
    assert load_profile(str(good)).ridge() == 100.0
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nkind = "cpu"\nmemory_bandwidth = 1e10\nbandwith = 3\n[peak_flops]\nfp32 = 1e12\n')
    with pytest.raises(KilnError, match="unknown key 'bandwith'"):
        profile_from_toml(bad)
    with pytest.raises(KilnError, match="unknown hardware profile 'nope'"):
        load_profile("nope")
    with pytest.raises(KilnError, match="does not exist"):
        load_profile(str(tmp_path / "missing.toml"))


def test_each_precision_is_judged_against_its_own_peak():
    from torch import nn

    from kiln.analysis.cost import AnnotateCost
    from kiln.analysis.roofline import by_precision, roofline
    from kiln.graph.capture import capture
    from kiln.graph.passes import PassManager
    from kiln.models.loaded import LoadedModel

    hw = HardwareProfile("toy", "", "accelerator", {"fp32": 100.0, "bf16": 400.0, "int8": 800.0}, 1e9)
    graph = capture(LoadedModel("t", nn.Linear(64, 64, bias=False), (torch.randn(256, 64),)))
    PassManager([AnnotateCost()]).run(graph)
    linear = next(n for n in graph.ops if n.op == "linear")
    flops, nbytes = 2 * 256 * 64 * 64, linear.cost.bytes
    assert roofline(graph, hw)[1].latency_s == pytest.approx(max(flops / 100, nbytes / 1e9))
    # bf16: its own peak and half the bytes; int8: its own peak and a quarter of them
    assert roofline(graph, hw, "bfloat16")[1].latency_s == pytest.approx(max(flops / 400, nbytes / 2 / 1e9))
    per = by_precision(graph, hw)
    assert per["latency_s"] == pytest.approx({"fp32": flops / 100, "bf16": flops / 400, "int8": flops / 800})
    assert per["fallback"] == []
    assert by_precision(graph, HardwareProfile("f", "", "cpu", {"fp32": 100.0}, 1e9))["fallback"] == ["bf16", "int8"]


def test_compile_fractions_use_each_candidates_precision_and_say_when_above_100_percent():
    from kiln.compile.run import attach_roofline
    from kiln.hardware.profiles import ABOVE_PEAK

    roof = {"flops": 1e9, "roofline_s": 0.010, "roofline_s_by_precision": {"fp32": 0.010, "bf16": 0.002}}
    report = {"candidates": [{"precision": "fp32", "latency_s": 0.020}, {"precision": "bf16", "latency_s": 0.004}]}
    attach_roofline(report, roof)
    fp32, bf16 = report["candidates"]
    assert fp32["roofline_fraction"] == pytest.approx(0.5) and bf16["roofline_fraction"] == pytest.approx(0.5)
    assert "note" not in report["roofline"]       # against fp32's peak, bf16 would read 250%
    fast = {"candidates": [{"precision": "fp32", "latency_s": 0.005}]}
    attach_roofline(fast, dict(roof))
    assert fast["candidates"][0]["roofline_fraction"] == pytest.approx(2.0) and fast["roofline"]["note"] == ABOVE_PEAK

"""Hardware profiles: built-ins cite every figure, user TOML profiles, calibration."""
import pytest

from kiln.errors import KilnError
from kiln.hardware.calibrate import calibrate
from kiln.hardware.profiles import available, load_profile, profile_from_toml, save_profile, user_dir

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
    p = calibrate("mybox", size=128, copy_mib=8, repeats=2)
    assert p.peak_flops["fp32"] > 1e8 and p.memory_bandwidth > 1e8
    path = save_profile(p)
    assert path.parent == user_dir()
    again = load_profile("mybox")
    assert again.peak_flops == pytest.approx(p.peak_flops, rel=1e-5)
    assert again.memory_bandwidth == pytest.approx(p.memory_bandwidth, rel=1e-5)
    assert again.measured_here and "mybox" in available()


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

"""Hardware profiles for rooflines: peak FLOP/s per dtype and memory bandwidth, each cited.

Built-in profiles are TOML files in kiln/hardware/builtin/; users add their own in the same
format under $KILN_HOME/hardware/ (default ~/.kiln/hardware/) or pass a TOML path.
`kiln hardware calibrate` measures this machine and writes such a file.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from kiln.errors import KilnError
from kiln.io import atomic_write_text

BUILTIN_DIR = Path(__file__).with_name("builtin")
DTYPE_KEYS = {
    "float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16",
    "int8": "int8", "uint8": "int8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8",
}
KINDS = ("cpu", "gpu", "tpu", "fpga", "accelerator")
INTEGER_KEYS = ("int8", "int4")


def peak_unit(key: str) -> str:
    """Integer peaks count operations, not floating-point ones: TOP/s, not TFLOP/s."""
    return "OP/s" if key in INTEGER_KEYS else "FLOP/s"


def user_dir() -> Path:
    return Path(os.environ.get("KILN_HOME", Path.home() / ".kiln")) / "hardware"


@dataclass(frozen=True)
class HardwareProfile:
    """Peak compute per dtype key (fp32, bf16, fp16, fp8, int8) in FLOP/s (OP/s for int)
    and memory bandwidth in bytes/s. `sources` cites each figure; `fallback` is the dtype key
    used for a dtype the device has no figure for (the report says so)."""

    name: str
    description: str
    kind: str
    peak_flops: dict[str, float]
    memory_bandwidth: float
    fallback: str = "fp32"
    sources: dict[str, str] = field(default_factory=dict)
    path: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise KilnError(f"hardware profile {self.name}: kind {self.kind!r} not one of {', '.join(KINDS)}")
        if not self.peak_flops or any(v <= 0 for v in self.peak_flops.values()):
            raise KilnError(f"hardware profile {self.name}: peak_flops needs positive figures")
        if self.memory_bandwidth <= 0:
            raise KilnError(f"hardware profile {self.name}: memory_bandwidth must be positive")
        if self.fallback not in self.peak_flops:
            raise KilnError(f"hardware profile {self.name}: fallback {self.fallback!r} has no peak_flops entry")

    @property
    def measured_here(self) -> bool:
        """Whether the figures were measured on this machine by `kiln hardware calibrate`."""
        return any("kiln hardware calibrate" in v for v in self.sources.values())

    def peak_for(self, dtype: str) -> tuple[float, str]:
        """(peak FLOP/s, dtype key used) for a torch dtype name such as 'float32'."""
        key = DTYPE_KEYS.get(dtype, self.fallback)
        return (self.peak_flops[key], key) if key in self.peak_flops else (self.peak_flops[self.fallback], self.fallback)

    def ridge(self, key: str | None = None) -> float:
        """The arithmetic intensity (FLOP/byte) where compute and memory time are equal."""
        return self.peak_flops[key or self.fallback] / self.memory_bandwidth

    def to_toml(self) -> str:
        lines = [f'name = "{self.name}"', f'description = "{self.description}"', f'kind = "{self.kind}"',
                 f"memory_bandwidth = {self.memory_bandwidth:.6g}", f'fallback = "{self.fallback}"',
                 "", "[peak_flops]"]
        lines += [f"{k} = {v:.6g}" for k, v in self.peak_flops.items()]
        lines += ["", "[sources]"] + [f'{k} = "{v}"' for k, v in self.sources.items()]
        return "\n".join(lines) + "\n"


# what must stand beside a measured figure that beats its roofline bound
ABOVE_PEAK = ("above 100%: the hardware profile's peaks are below what this run achieved; "
              "re-measure them with `kiln hardware calibrate --force`")


def fraction_note(fraction: float | None) -> str:
    """'' for a measured fraction of a roofline bound up to 100%; above it, the sentence that
    must stand beside it."""
    return ABOVE_PEAK if fraction is not None and fraction > 1 else ""


def figures(p: HardwareProfile) -> dict[str, float]:
    """Every peak and the bandwidth, by key."""
    return p.peak_flops | {"memory_bandwidth": p.memory_bandwidth}


def higher_in(old: HardwareProfile, new: HardwareProfile, tolerance: float = 0.02) -> dict[str, tuple[float, float]]:
    """The figures `old` has above `new` by more than `tolerance` (relative): key -> (old, new).
    A peak is a maximum, so a profile with a higher figure is the better measurement of it."""
    a, b = figures(old), figures(new)
    return {k: (a[k], b[k]) for k in a if k in b and a[k] > b[k] * (1 + tolerance)}


_FIELDS = {"name", "description", "kind", "peak_flops", "memory_bandwidth", "fallback", "sources"}


def profile_from_toml(path: Path) -> HardwareProfile:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KilnError(f"cannot read hardware profile {path}: {exc}") from None
    unknown = set(data) - _FIELDS
    if unknown:
        raise KilnError(f"hardware profile {path}: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(_FIELDS))}")
    missing = {"name", "kind", "peak_flops", "memory_bandwidth"} - set(data)
    if missing:
        raise KilnError(f"hardware profile {path}: missing key {sorted(missing)[0]!r}")
    try:
        return HardwareProfile(
            name=str(data["name"]), description=str(data.get("description", "")), kind=str(data["kind"]),
            peak_flops={str(k): float(v) for k, v in data["peak_flops"].items()},
            memory_bandwidth=float(data["memory_bandwidth"]), fallback=str(data.get("fallback", "fp32")),
            sources={str(k): str(v) for k, v in data.get("sources", {}).items()}, path=str(path),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise KilnError(f"hardware profile {path}: bad value: {exc}") from None


def available() -> dict[str, Path]:
    """Profile name -> TOML file; user profiles shadow built-in ones of the same name."""
    found = {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.toml"))}
    if user_dir().is_dir():
        found |= {p.stem: p for p in sorted(user_dir().glob("*.toml"))}
    return found


def load_profile(name_or_path: str) -> HardwareProfile:
    """A profile by name (built-in or user) or by the path of a TOML file."""
    if name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if not path.is_file():
            raise KilnError(f"hardware profile file {name_or_path} does not exist")
        return profile_from_toml(path)
    profiles = available()
    if name_or_path not in profiles:
        hint = " (run `kiln hardware calibrate` to measure this machine)" if name_or_path == "local" else ""
        raise KilnError(f"unknown hardware profile {name_or_path!r}{hint}; known: {', '.join(sorted(profiles))} or a .toml path")
    return profile_from_toml(profiles[name_or_path])


def save_profile(profile: HardwareProfile) -> Path:
    """Write a profile to the user directory atomically; returns its path."""
    directory = user_dir()
    directory.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(directory / f"{profile.name}.toml", profile.to_toml())

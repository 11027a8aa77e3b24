"""Cluster profiles: devices, their memory, how many share a node, and the links between them,
each figure with its cited source (like kiln/hardware/builtin/*.toml).

Built-in profiles live in kiln/plan/clusters/*.toml; `kiln cluster calibrate` writes this
machine's measured `local` profile under $KILN_HOME/clusters/ (default ~/.kiln/clusters/),
which shadows the built-in one. A profile that lacks a figure, or a figure's source, is a
one-line error naming it.
"""
from __future__ import annotations

import enum
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from kiln.config import from_dict, to_dict, to_toml
from kiln.errors import KilnError
from kiln.io import atomic_write_text
from kiln.plan.collectives import Collective, Fitted, Link, best_all_reduce, collective_time, fitted_time, steps

BUILTIN_DIR = Path(__file__).with_name("clusters")


class Precision(enum.Enum):
    """How a step computes and what a parameter costs in memory (ZeRO, arXiv 1910.02054, sec. 3.1):
    bf16 mixed precision keeps 2-byte weights and gradients and K=12 bytes of fp32 master weights,
    momentum and variance for Adam; fp32 keeps 4 + 4 and Adam's 8. Both total 16 bytes."""

    BF16 = "bf16"
    FP32 = "fp32"

    @property
    def weight_bytes(self) -> int:
        return 2 if self is Precision.BF16 else 4

    @property
    def optimizer_bytes(self) -> int:
        """K in ZeRO's (2 + 2 + K) psi, for Adam."""
        return 12 if self is Precision.BF16 else 8

    @property
    def dtype(self) -> str:
        return "bfloat16" if self is Precision.BF16 else "float32"


@dataclass(frozen=True)
class LinkConfig:
    latency_s: float
    bandwidth: float           # bytes/s per device, one direction

    def __post_init__(self):
        if not (self.latency_s >= 0 and self.bandwidth > 0):
            raise ValueError(f"a link needs latency_s >= 0 and bandwidth > 0, got {self.latency_s}, {self.bandwidth}")


@dataclass(frozen=True)
class CalibratedConfig:
    """One collective measured on this machine: per process count, the whole collective's
    latency (all its algorithm's steps) and its bus bandwidth, for messages above split_bytes
    and (small_*) up to it."""

    processes: tuple[int, ...]
    latency_s: tuple[float, ...]
    bus_bandwidth: tuple[float, ...]
    split_bytes: float = 0.0                      # messages up to this size use the small_* fits
    small_latency_s: tuple[float, ...] = ()
    small_bus_bandwidth: tuple[float, ...] = ()

    def __post_init__(self):
        if not (len(self.processes) == len(self.latency_s) == len(self.bus_bandwidth) >= 1):
            raise ValueError("processes, latency_s and bus_bandwidth need one entry each per process count")
        if self.split_bytes and not (len(self.small_latency_s) == len(self.small_bus_bandwidth) == len(self.processes)):
            raise ValueError("split_bytes needs small_latency_s and small_bus_bandwidth for each process count")

    def fits(self, op: Collective) -> tuple[Fitted, ...]:
        """The fits as `op`'s algorithm sees them: latency per step (the profile's latency at n
        over the algorithm's step count at n)."""
        small = zip(self.small_latency_s, self.small_bus_bandwidth) if self.split_bytes else \
            [(0.0, 0.0)] * len(self.processes)
        per = lambda latency, n: latency / max(steps(op, n), 1)
        return tuple(Fitted(n, per(a, n), b, self.split_bytes, per(sa, n), sb)
                     for (n, a, b), (sa, sb) in zip(zip(self.processes, self.latency_s, self.bus_bandwidth), small))

    @classmethod
    def of(cls, op: Collective, large: list[Fitted], small: list[Fitted], split: float) -> "CalibratedConfig":
        """The profile entry of per-step fits (one per process count, large and small messages)."""
        total = lambda f: f.latency_s * max(steps(op, f.processes), 1)
        return cls(tuple(f.processes for f in large), tuple(total(f) for f in large),
                   tuple(f.bus_bandwidth for f in large), float(split), tuple(total(f) for f in small),
                   tuple(f.bus_bandwidth for f in small))


@dataclass(frozen=True)
class ContentionConfig:
    """How much longer one process's compute takes while N processes of the node compute at
    once than while it runs alone, each on its own core (`slowdown` per count in `processes`;
    1 process: 1). Cores share the caches, the memory bus and, on a virtual machine, whatever
    the host maps the virtual CPUs to: on the kiln development machine one thread's step of
    zoo:gpt takes 0.197 s alone and two threads take 0.132 s, 1.34x the 0.098 s a perfect
    split would give (benchmarks/results/parallel_quiet.json). `kiln cluster calibrate`
    measures it with N concurrent copies of one compute probe (kiln.plan.calibrate)."""

    processes: tuple[int, ...]
    slowdown: tuple[float, ...]

    def __post_init__(self):
        if not (len(self.processes) == len(self.slowdown) >= 1) or min(self.processes) < 2 \
                or list(self.processes) != sorted(set(self.processes)) or min(self.slowdown) <= 0:
            raise ValueError("contention needs increasing process counts >= 2 and a positive slowdown for each")

    def at(self, n: int) -> float:
        """The slowdown of n processes at once: measured, or linear in n between the measured
        counts (1 at 1 process), the largest count's beyond them."""
        points = [(1, 1.0), *zip(self.processes, self.slowdown)]
        if n >= points[-1][0]:
            return points[-1][1]
        (a, sa), (b, sb) = next((p, q) for p, q in zip(points, points[1:]) if p[0] <= n <= q[0])
        return sa + (sb - sa) * (n - a) / (b - a)


@dataclass(frozen=True)
class ClusterConfig:
    """A cluster as its TOML file says it; `sources` cites every figure by its key."""

    name: str
    description: str
    device: str                 # a kiln hardware profile (kiln/hardware/builtin, or `local`)
    device_memory: float        # bytes per device
    devices_per_node: int
    max_nodes: int
    precision: Precision
    intra: LinkConfig
    inter: LinkConfig | None = None
    share_node: bool = False    # devices are processes sharing one machine's compute (local)
    collectives: dict[str, CalibratedConfig] = field(default_factory=dict)
    contention: ContentionConfig | None = None   # processes sharing the node slow each other (share_node)
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.device_memory <= 0 or self.devices_per_node < 1 or self.max_nodes < 1:
            raise ValueError("device_memory must be > 0, devices_per_node and max_nodes >= 1")
        if self.max_nodes > 1 and self.inter is None:
            raise ValueError("missing figure 'inter' (latency_s, bandwidth): a multi-node cluster needs its network")
        unknown = sorted(set(self.collectives) - {c.value for c in Collective})
        if unknown:
            raise ValueError(f"unknown collective {unknown[0]!r}; accepted: {', '.join(c.value for c in Collective)}")


def figure_keys(c: ClusterConfig) -> list[str]:
    """The figures that need a source."""
    keys = ["device", "device_memory", "devices_per_node", "max_nodes", "precision",
            "intra.latency_s", "intra.bandwidth"]
    keys += ["inter.latency_s", "inter.bandwidth"] if c.inter else []
    keys += ["contention"] if c.contention else []
    return keys + [f"collectives.{k}" for k in c.collectives]


@dataclass(frozen=True)
class Cluster:
    """A loaded cluster: its config, and the time of a collective within a group of devices."""

    config: ClusterConfig
    path: str = ""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def max_devices(self) -> int:
        return self.config.devices_per_node * self.config.max_nodes

    def slowdown(self, devices: int) -> float:
        """How much slower each process computes with `devices` of them at once on a node whose
        devices share its cores (1 where each device is its own chip, or nothing was measured)."""
        c = self.config
        if not c.share_node or c.contention is None:
            return 1.0
        return c.contention.at(min(devices, c.devices_per_node))

    def link(self, group: int, stride: int) -> Link:
        """The slowest link a group of `group` devices `stride` apart crosses (devices are
        numbered node by node): the network once the group spans nodes."""
        c = self.config
        spans = group > 1 and (group - 1) * stride >= c.devices_per_node
        chosen = c.inter if spans and c.inter else c.intra
        return Link(chosen.latency_s, chosen.bandwidth)

    def time(self, op: Collective, size: float, group: int, stride: int = 1) -> float:
        """Seconds of one collective of `size` bytes among `group` devices, `stride` apart:
        measured fits where the profile has them, else the alpha-beta formulas (the faster of
        ring and tree for all-reduce)."""
        if group <= 1 and op is not Collective.P2P:
            return 0.0
        measured = self.config.collectives.get(op.value)
        if measured is not None:
            return fitted_time(op, size, group, measured.fits(op))
        link = self.link(group if op is not Collective.P2P else 2, stride)
        if op is Collective.ALL_REDUCE:
            return best_all_reduce(size, group, link)[0]
        return collective_time(op, size, group, link)


def user_dir() -> Path:
    return Path(os.environ.get("KILN_HOME", Path.home() / ".kiln")) / "clusters"


def available() -> dict[str, Path]:
    """Profile name -> TOML file; user profiles shadow built-in ones of the same name."""
    found = {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.toml"))}
    if user_dir().is_dir():
        found |= {p.stem: p for p in sorted(user_dir().glob("*.toml"))}
    return found


def cluster_from_toml(path: Path) -> Cluster:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise KilnError(f"cannot read cluster profile {path}: {exc}") from None
    config = from_dict(ClusterConfig, data, f"cluster profile {path}")
    missing = [k for k in figure_keys(config) if not config.sources.get(k, "").strip()]
    if missing:
        raise KilnError(f"cluster profile {path}: figure {missing[0]!r} has no source; "
                        f"every figure needs one under [sources]")
    return Cluster(config, str(path))


def load_cluster(name_or_path: str) -> Cluster:
    """A cluster profile by name (built-in or user) or by the path of a TOML file."""
    if name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if not path.is_file():
            raise KilnError(f"cluster profile file {name_or_path} does not exist")
        return cluster_from_toml(path)
    profiles = available()
    if name_or_path not in profiles:
        raise KilnError(f"unknown cluster profile {name_or_path!r}; known: {', '.join(sorted(profiles))} or a .toml path")
    return cluster_from_toml(profiles[name_or_path])


def save_cluster(config: ClusterConfig) -> Path:
    """Write a profile to the user directory atomically; returns its path."""
    directory = user_dir()
    directory.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(directory / f"{config.name}.toml", to_toml(to_dict(config)))

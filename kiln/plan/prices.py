"""Dollars: a sourced table of on-demand cloud instance prices (prices.toml), the time and cost
of a training run under a plan, and the cheapest plan that meets a deadline."""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from kiln.config import from_dict
from kiln.errors import KilnError

PRICES = Path(__file__).with_name("prices.toml")


@dataclass(frozen=True)
class InstanceConfig:
    name: str
    provider: str
    device: str            # the kiln hardware profile its accelerators match (a100, h100, tpu-v4, ...)
    devices: int
    usd_per_hour: float
    source: str
    published: str         # the date the price was published as recalled (see prices.toml's note)

    def __post_init__(self):
        if self.devices < 1 or self.usd_per_hour <= 0:
            raise ValueError(f"instance {self.name}: devices >= 1 and usd_per_hour > 0 needed")

    def cost(self, devices: int, hours: float) -> float:
        """Whole instances are billed: ceil(devices / per instance) of them for `hours`."""
        return math.ceil(devices / self.devices) * self.usd_per_hour * hours


def instances(path: Path = PRICES) -> list[InstanceConfig]:
    data = tomllib.loads(path.read_text())
    return [from_dict(InstanceConfig, t, f"{path.name} instance {i}") for i, t in enumerate(data.get("instance", []))]


def instance_for(device: str, name: str | None = None) -> InstanceConfig | None:
    """The named instance, else the cheapest per device of those with this device; None if none."""
    table = instances()
    if name:
        found = next((i for i in table if i.name == name), None)
        if found is None:
            raise KilnError(f"unknown instance {name!r}; known: {', '.join(i.name for i in table)}")
        return found
    matching = [i for i in table if i.device == device]
    return min(matching, key=lambda i: i.usd_per_hour / i.devices) if matching else None


@dataclass(frozen=True)
class Budget:
    """How much training: `steps` optimizer steps, or `tokens` (samples for non-sequence models)."""

    steps: int | None = None
    tokens: float | None = None

    def steps_for(self, global_batch: int, seq: int) -> int | None:
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return math.ceil(self.tokens / (global_batch * seq))
        return None

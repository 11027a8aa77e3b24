"""What every model spec loads to: a module and inputs it runs on."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LoadedModel:
    """A model ready to run: `model(*example_inputs, **example_kwargs)` works.

    `spec` is the spec string it came from, `family` the model family (cnn, transformer, ...),
    `task` what its output means; `input_names` names the positional inputs then the keyword
    ones, so a user can override shapes by name. `size_inputs` names keyword inputs whose
    values are sizes rather than data (a vision tower's grid of patches, `grid_thw`): the
    captured graph is specialised to them, as it is to every input's shape.
    `value_specialised` allows capture, where torch.export stops on control flow or a size that
    depends on an input's values, to specialise the graph to the example's values instead
    (transformers models: an attention mask checked for padding, an MoE's token counts).
    """

    spec: str
    model: torch.nn.Module
    example_inputs: tuple = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = "custom"
    task: str = "unknown"
    description: str = ""
    size_inputs: tuple[str, ...] = ()
    value_specialised: bool = False

    @property
    def input_names(self) -> list[str]:
        return [f"input{i}" for i in range(len(self.example_inputs))] + list(self.example_kwargs)

    def run(self) -> Any:
        with torch.no_grad():
            return self.model(*self.example_inputs, **self.example_kwargs)


def available_bytes() -> int:
    """Memory this process could still take (Linux MemAvailable; total RAM elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (a tied weight counted once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def is_meta(model: torch.nn.Module) -> bool:
    """Whether the model has no weights (a parameter or buffer on the meta device: kiln.models.meta)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))

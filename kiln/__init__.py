"""kiln: see how a PyTorch model maps onto hardware, and make it smaller and faster.

Importing kiln is light: torch is imported, transformers and other heavy packages only
when a capability needs them.
"""
from __future__ import annotations

import logging

# transformers imports torchao when it is installed; torchao logs a warning for each CUDA-only
# extension it cannot load on a CPU machine, and torch one per Enum torchao registers: noise
# on every command, not a problem
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
# the ONNX exporter warns once per export that torchvision (which kiln does not use) is missing
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

__version__ = "0.1.0"

__all__ = ["load", "capture", "analyze", "KilnError", "__version__"]


def __getattr__(name: str):
    if name == "load":
        from kiln.models.spec import load   # lazy: `import kiln` stays light (no torch)

        return load
    if name == "capture":
        from kiln.graph.capture import capture   # lazy: `import kiln` stays light (no torch)

        return capture
    if name == "analyze":
        from kiln.analysis.report import analyze   # lazy: `import kiln` stays light (no torch)

        return analyze
    if name == "KilnError":
        from kiln.errors import KilnError   # lazy: `import kiln` stays light (no torch)

        return KilnError
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")

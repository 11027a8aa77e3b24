"""Capture a model into a kiln Graph with torch.export (non-strict).

torch.fx.symbolic_trace fails on transformers 5.x; torch.export handles them. When capture
fails, the error names the construct: the exception type, its first line and the last frame
of the user's (non-torch) code it came from.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import traceback

import torch

from kiln.errors import KilnError, first_line
from kiln.graph.graph import Graph
from kiln.models.loaded import LoadedModel


def _user_frame(exc: BaseException) -> str:
    """'file.py:LINE in func: code' of the deepest frame outside torch, if any."""
    torch_dir = os.path.dirname(torch.__file__)
    kiln_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith((torch_dir, kiln_dir))]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def capture(loaded: LoadedModel, dynamic_batch: bool = False) -> Graph:
    """Export `loaded.model` on its example inputs into a Graph (eval mode, no grad)."""
    model = loaded.model.eval()
    args, kwargs, dynamic_shapes = tuple(loaded.example_inputs), dict(loaded.example_kwargs), None
    export = torch.export.export
    if loaded.size_inputs:
        # Inputs that are sizes (a grid of patches): the model reads their values (.tolist(),
        # int()) to size its tensors, which export refuses as data-dependent. Draft mode reads
        # them off the example instead, so the graph is specialised to those sizes (and to any
        # other value the model branches on), as it is to every input's shape; its first dim
        # is not a batch, so no dynamic batch either.
        export, dynamic_batch = torch.export.draft_export, False
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        dynamic_shapes = _batch_dims(loaded, batch)
        # export specialises a size-1 dim to the constant 1: trace at batch 2 instead
        args, kwargs = _at_least_batch_2(args), {k: _at_least_batch_2(v) for k, v in kwargs.items()}
    try:
        with torch.no_grad(), _quiet_torch():
            program = export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        return Graph(program, name=loaded.spec)
    except Exception as exc:  # torch.export raises many types; all are the model's construct
        if (export is torch.export.draft_export or dynamic_batch or not loaded.value_specialised
                or not _data_dependent(exc)):
            raise _capture_error(loaded, exc) from None
        first = exc
    # Control flow or sizes that depend on the input's values (longformer's `if is_global_attn`,
    # an MoE's per-expert token counts, a codec's padding read off the signal), in a model that
    # allows it (loaded.value_specialised; never with a dynamic batch, which a value may depend
    # on): draft mode reads each such value off the example, so the graph is the one the
    # example takes, specialised to those values as it is to every shape.
    try:
        with torch.no_grad(), _quiet_torch():
            program = torch.export.draft_export(model, tuple(loaded.example_inputs), dict(loaded.example_kwargs),
                                                strict=False)
        return Graph(program, name=loaded.spec)
    except Exception:  # noqa: BLE001 - the first error is the one that names the construct
        raise _capture_error(loaded, first) from None


_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "PendingUnbackedSymbolNotFound", "DataDependentOutputException",
                   "data-dependent")


def _data_dependent(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(word in text for word in _DATA_DEPENDENT)


def _capture_error(loaded: LoadedModel, exc: BaseException) -> KilnError:
    return KilnError(f"cannot capture {loaded.spec} with torch.export: {type(exc).__name__}: "
                     f"{first_line(exc)}{_user_frame(exc)}")


@contextlib.contextmanager
def _quiet_torch():
    """torch.export prints the partial graph (hundreds of lines for a transformer) to stderr
    and logs symbolic-shape warnings before it raises; the one-line KilnError says what failed.
    Kept for `kiln --verbose` (the `kiln` logger at DEBUG)."""
    if logging.getLogger("kiln").isEnabledFor(logging.DEBUG):
        yield
        return
    # torch's symbolic-shape logger has its own level (draft mode warns there for each value
    # it reads off the example)
    logs = [logging.getLogger(name) for name in ("torch", "torch.fx.experimental.symbolic_shapes")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def _at_least_batch_2(x):
    if isinstance(x, tuple):
        return tuple(_at_least_batch_2(v) for v in x)
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1:
        return x.expand(2, *x.shape[1:]).clone()
    return x


def _batch_dims(loaded: LoadedModel, batch) -> tuple | dict:
    def spec(x):
        return {0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    if loaded.example_kwargs and not loaded.example_inputs:
        return {k: spec(v) for k, v in loaded.example_kwargs.items()}
    return tuple(spec(x) for x in loaded.example_inputs) + tuple(spec(v) for v in loaded.example_kwargs.values())

"""Memory layout: channels-last (NHWC) for 2-D convolutions.

PyTorch runs a convolution in channels-last when its input or weight is (the CPU and cuDNN
paths both follow `suggest_memory_format`), and elementwise ops keep their input's layout. So
storing 4-D conv weights channels-last switches every conv, and the chains after it, to NHWC
without new ops. Values do not change; only strides do, and a `view` that needed the old
strides becomes a `reshape` (found by re-running shape propagation). Whether NHWC is faster
is for the backends to measure; `ChannelsLastInputs` feeds a module channels-last inputs too.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from kiln.compile.edit import ProgramEdit, arguments, packet_name, val
from kiln.compile.passes import PASSES, NoConfig
from kiln.graph.graph import Graph
from kiln.graph.passes import PassResult

aten = torch.ops.aten
fx = torch.fx
CL = torch.channels_last
LAYOUT_KEY = "kiln_layout"


class MemoryFormat(enum.Enum):
    CONTIGUOUS = "contiguous"
    CHANNELS_LAST = "channels_last"


@dataclass(frozen=True)
class ChannelsLastRecord:
    convs: tuple[str, ...]            # conv nodes now running channels-last
    weights: tuple[str, ...]          # FQNs of the weights stored channels-last
    reshaped_views: tuple[str, ...]   # views whose input lost the strides they needed
    note: str = ""                    # why nothing was changed, when it could not be done


def _is_cl(t: torch.Tensor) -> bool:
    return tuple(t.stride()) == tuple(t.contiguous(memory_format=CL).stride())


@PASSES.register("channels_last")
class ChannelsLast:
    """Prefers channels-last for every 2-D convolution over a lifted 4-D weight."""

    name = "channels_last"
    Config = NoConfig

    def __init__(self, config: NoConfig = NoConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult[ChannelsLastRecord]:
        edit = ProgramEdit(graph)
        convs, weights = [], {}
        for node in edit.graph.nodes:
            if packet_name(node) not in ("conv2d", "convolution"):
                continue
            w = arguments(node)[1]
            if not edit.is_state(w) or val(w).dim() != 4:
                continue
            convs.append(node.name)
            node.meta[LAYOUT_KEY] = MemoryFormat.CHANNELS_LAST
            if not _is_cl(edit.value(w)):
                weights[w] = edit.value(w).contiguous(memory_format=CL)
        if not weights:
            return PassResult(graph, False, ChannelsLastRecord(tuple(convs), (), ()))
        for w, t in weights.items():
            edit.set_state(w, t)
        try:
            reshaped = _repropagate(edit)
        except Exception as exc:   # an op whose value cannot be recomputed: leave the layout alone
            return PassResult(graph, False, ChannelsLastRecord((), (), (), f"shape propagation failed: {exc}"))
        record = ChannelsLastRecord(tuple(convs), tuple(edit.fqn(w) for w in weights), tuple(reshaped))
        return PassResult(edit.finish(), True, record)


def _repropagate(edit: ProgramEdit) -> list[str]:
    """Recompute every fake value with the new strides; views that fail become reshapes."""
    reshaped = []
    for node in edit.graph.nodes:
        if node.op != "call_function":
            continue
        try:
            edit.infer(node)
        except Exception:   # fake kernels raise RuntimeError or ValueError for a bad view
            if node.target is not aten.view.default:
                raise
            node.target = aten.reshape.default
            edit.infer(node)
            reshaped.append(node.name)
    return reshaped


def preferred_format(graph: Graph, name: str) -> MemoryFormat:
    """The memory format the layout pass chose for node `name` (contiguous by default)."""
    for fx_node, _ in graph.fx_nodes():
        if fx_node.name == name:
            return fx_node.meta.get(LAYOUT_KEY, MemoryFormat.CONTIGUOUS)
    raise KeyError(f"no node {name!r} in {graph.name}")


def channels_last(x):
    """4-D tensors (and those in tuples/lists/dicts) as channels-last; the rest unchanged."""
    if isinstance(x, torch.Tensor):
        return x.contiguous(memory_format=CL) if x.dim() == 4 else x
    if isinstance(x, (list, tuple)):
        return type(x)(channels_last(i) for i in x)
    if isinstance(x, dict):
        return {k: channels_last(v) for k, v in x.items()}
    return x


class ChannelsLastInputs(torch.nn.Module):
    """Runs `module` on channels-last copies of its 4-D inputs."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*channels_last(args), **channels_last(kwargs))

"""Typed metadata of kiln graph nodes: one record per FX node, one dataclass per analysis."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from math import prod


class NodeKind(enum.Enum):
    INPUT = "input"          # a user input of the model
    PARAM = "param"          # a parameter, lifted to a graph input by torch.export
    BUFFER = "buffer"        # a buffer (running stats, position ids), likewise
    CONSTANT = "constant"    # a lifted tensor constant
    OP = "op"                # a call_function: the work
    OUTPUT = "output"


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one tensor a node produces."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def itemsize(self) -> int:
        if self.dtype not in _ITEMSIZE:
            import torch

            _ITEMSIZE[self.dtype] = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return _ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def __str__(self) -> str:
        return "x".join(map(str, self.shape)) or "scalar"


_ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
    "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1,
}


@dataclass(frozen=True)
class Cost:
    """FLOPs (a multiply-add counts 2, as torch.utils.flop_counter) and bytes moved by one node.

    Bytes follow the unfused convention: every tensor input is read once from memory and every
    output written once; views and aliases move nothing.
    """

    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    counted: bool = True   # False when no FLOP formula applied and the op was not a known zero

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """Arithmetic intensity in FLOP/byte (0 where nothing moves)."""
        return self.flops / self.bytes if self.bytes else 0.0


@dataclass
class Node:
    """One node of a kiln Graph: what it is, where it came from, what it produces.

    `module` is the fully qualified name of the innermost nn.Module the op ran in ("" for the
    root), taken from torch.export's nn_module_stack; `params` are the FQNs of the parameters
    and buffers the node reads directly.
    """

    name: str
    kind: NodeKind
    target: str
    op: str
    module: str = ""
    module_type: str = ""
    outputs: tuple[TensorMeta, ...] = ()
    inputs: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    is_view: bool = False
    cost: Cost | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.outputs[0].shape if self.outputs else ()

    @property
    def dtype(self) -> str:
        return self.outputs[0].dtype if self.outputs else ""

    @property
    def out_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)

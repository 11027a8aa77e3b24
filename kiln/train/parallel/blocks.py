"""The repeated blocks of a model (a transformer's layers, a CNN's stages): what FSDP shards
one by one, what activation checkpointing recomputes, and what a pipeline may cut between."""
from __future__ import annotations

from torch import nn


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of the longest ModuleList/Sequential whose members hold parameters
    (GPT's and ViT's `blocks`, Llama's `layers`, BERT's `encoder.layer`); empty if none has
    two such members."""
    best: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            members = [(f"{name}.{k}" if name else k, m) for k, m in module.named_children()
                       if any(True for _ in m.parameters())]
            if len(members) > len(best):
                best = members
    return best if len(best) >= 2 else []


def checkpoint_blocks(model: nn.Module) -> int:
    """Wrap each repeated block so its activations are recomputed in backward; returns how many.
    A block holding batch norm is left alone: recomputing it would update the running
    statistics a second time each step."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    blocks = {id(m) for _, m in repeated_blocks(model)
              if not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())}
    apply_activation_checkpointing(model, check_fn=lambda m: id(m) in blocks)
    return len(blocks)

"""A model as a chain of units a pipeline can cut between: the embedding, each block, the head.

torch.distributed.pipelining's tracer breaks on many real models (pytorch/pytorch 145263,
184361), so kiln builds each stage by hand (the manual PipelineStage front end) from units
that hold the model's own submodules and parameters, for the model families it knows: the
zoo's GPT and ViT, its CNNs, transformers' Llama-style decoders, and any nn.Sequential. Each
unit knows which modules it runs, so its cost is read from kiln.analysis's per-module FLOPs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kiln.analysis.cost import AnnotateCost
from kiln.errors import KilnError
from kiln.graph.capture import capture
from kiln.graph.passes import PassManager
from kiln.models.loaded import LoadedModel


class Unit(nn.Module):
    """Runs `fn(self, x)`; holds the model's own submodules and parameters (shared, not copied)."""

    def __init__(self, name: str, fn: Callable, prefixes: tuple[str, ...], **parts):
        super().__init__()
        self.unit_name, self.fn, self.prefixes = name, fn, prefixes
        for key, part in parts.items():
            setattr(self, key, part)

    def forward(self, x):
        return self.fn(self, x)


def _call(u, x):
    return u.block(x)


def _gpt_embed(u, idx):
    return u.drop(u.wte(idx) + u.wpe(torch.arange(idx.shape[1], device=idx.device)))


def _gpt_head(u, x):
    return u.lm_head(u.ln_f(x))


def _vit_embed(u, x):
    tokens = u.patch_embed(x).flatten(2).transpose(1, 2)
    return torch.cat([u.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + u.pos_embed


def _vit_head(u, x):
    return u.head(u.norm(x)[:, 0])


def _cnn_head(u, x):
    return u.fc(u.dropout(x.flatten(1)))


def _decoder_embed(u, ids):
    return u.embed_tokens(ids)


def _decoder_layer(u, h):
    """One Llama-style decoder layer as the decoder's forward runs it: the rotary position
    embeddings and the causal mask (transformers' own create_causal_mask) rebuilt from the hidden
    states, so a stage passes only the hidden states on."""
    from transformers.masking_utils import create_causal_mask

    positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
    mask = create_causal_mask(config=u.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=positions)
    return u.block(h, attention_mask=mask, position_ids=positions, position_embeddings=u.rotary_emb(h, position_ids=positions))


def _decoder_head(u, h):
    h = u.norm(h)
    return u.lm_head(h) if hasattr(u, "lm_head") else h


def _decoder(model) -> list[Unit] | None:
    """transformers' Llama-style decoders (Llama, Mistral, Qwen2, ...: `embed_tokens`, `layers`,
    `norm`, `rotary_emb`), the base model or one with a causal-LM head (`model.` + `lm_head`)."""
    base, prefix = (model.model, "model.") if hasattr(model, "lm_head") and hasattr(model, "model") else (model, "")
    if not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb", "config")):
        return None
    config = base.config
    head = {"lm_head": model.lm_head} if base is not model else {}
    layers = [Unit(f"{prefix}layers.{i}", _decoder_layer, (f"{prefix}layers.{i}",), block=b, rotary_emb=base.rotary_emb)
              for i, b in enumerate(base.layers)]
    for u in layers:
        u.config = config   # read by the causal mask
    return [Unit(f"{prefix}embed_tokens", _decoder_embed, (f"{prefix}embed_tokens", f"{prefix}rotary_emb"),
                 embed_tokens=base.embed_tokens),
            *layers,
            Unit(f"{prefix}norm", _decoder_head, (f"{prefix}norm", *head), norm=base.norm, **head)]


def _blocks(model, attr: str) -> list[Unit]:
    return [Unit(f"{attr}.{i}", _call, (f"{attr}.{i}",), block=b) for i, b in enumerate(getattr(model, attr))]


def chain(model: nn.Module) -> list[Unit]:
    """The model's units in order; a model kiln cannot cut is a KilnError naming what it can."""
    kind = type(model).__name__
    if kind == "GPT":
        return [Unit("wte", _gpt_embed, ("wte", "wpe", "drop"), wte=model.wte, wpe=model.wpe, drop=model.drop),
                *_blocks(model, "blocks"),
                Unit("ln_f", _gpt_head, ("ln_f", "lm_head"), ln_f=model.ln_f, lm_head=model.lm_head)]
    if kind == "ViT":
        return [Unit("patch_embed", _vit_embed, ("patch_embed",), patch_embed=model.patch_embed,
                     cls_token=model.cls_token, pos_embed=model.pos_embed),
                *_blocks(model, "blocks"), Unit("norm", _vit_head, ("norm", "head"), norm=model.norm, head=model.head)]
    if kind == "MnistCNN":
        return [*_blocks(model, "features"), Unit("fc", _cnn_head, ("dropout", "fc"), dropout=model.dropout, fc=model.fc)]
    if isinstance(model, nn.Sequential):
        return _blocks_of_sequential(model)
    units = _decoder(model)
    if units is not None:
        return units
    raise KilnError(f"pipeline parallel: kiln cannot cut {kind} into stages; it cuts the zoo's GPT (zoo:gpt), "
                    f"ViT (zoo:vit_tiny), CNN (zoo:cnn), transformers' Llama-style decoders and any nn.Sequential")


def _blocks_of_sequential(model: nn.Sequential) -> list[Unit]:
    return [Unit(name, _call, (name,), block=m) for name, m in model.named_children()]


def unit_flops(model: nn.Module, units: list[Unit], example, spec: str = "model") -> list[int]:
    """Forward FLOPs of each unit, from kiln.analysis's per-module costs of the captured graph
    (a unit runs its modules; ops outside any module are a few adds and are left out)."""
    was = model.training
    graph = capture(LoadedModel(spec, model.eval(), (example,)))
    model.train(was)
    PassManager([AnnotateCost()]).run(graph)
    costs = [0] * len(units)
    for node in graph:
        if node.cost is None:
            continue
        for i, u in enumerate(units):
            if any(node.module == p or node.module.startswith(p + ".") for p in u.prefixes):
                costs[i] += node.cost.flops
                break
    return costs


def balance(costs: list[int], parts: int) -> list[int]:
    """Cut `costs` into `parts` contiguous non-empty runs minimising the largest sum (the
    slowest stage sets a pipeline's pace); returns the index where each run after the first
    begins. Exact dynamic programme, O(parts * n^2)."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                worst = max(best[k - 1][i], prefix[j] - prefix[i])
                if worst < best[k][j]:
                    best[k][j], cut[k][j] = worst, i
    starts, j = [], n
    for k in range(parts, 0, -1):
        j = cut[k][j]
        starts.append(j)
    return sorted(starts)[1:]

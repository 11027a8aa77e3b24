"""A decoder-only GPT at nanoGPT scale for character-level language modelling."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kiln.models.loaded import LoadedModel
from kiln.models.zoo import register
from kiln.models.zoo.layers import Block


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256    # bytes: any character-level vocabulary up to 256 symbols fits
    block_size: int = 64     # the longest context
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")


class GPT(nn.Module):
    """GPT-2's architecture (Radford et al. 2019) at the scale of nanoGPT's character-level
    Shakespeare config: learned positions, pre-LN causal blocks, a final LayerNorm and an
    output head tied to the token embedding (Press & Wolf 2017)."""

    def __init__(self, config: GPTConfig = GPTConfig()):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config.n_embd, config.n_head, causal=True, dropout=config.dropout) for _ in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer), as the residual stream
        # sums two of them per layer
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int, temperature: float = 1.0) -> torch.Tensor:
        """Sample `new_tokens` more tokens after the context `idx` (B, T)."""
        for _ in range(new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, -1] / temperature
            idx = torch.cat([idx, torch.multinomial(logits.softmax(-1), 1)], dim=1)
        return idx


@register("gpt", params=834_304, family="transformer", task="language-modeling", dataset="rt-lm",
          default_input="1x64 int64 token ids",
          description="char-level GPT (nanoGPT scale: 4 layers, 4 heads, 128 wide, context 64, tied head)")
def gpt() -> LoadedModel:
    torch.manual_seed(0)
    config = GPTConfig()
    return LoadedModel("zoo:gpt", GPT(config).eval(), (torch.randint(0, config.vocab_size, (1, config.block_size)),))

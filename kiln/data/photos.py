"""Photos for the ImageNet zoo models: the user's own ImageFolder, resized and normalised the
way torchvision's ImageNet evaluation does. No ImageNet images ship offline, so `path` is
required; `kiln train zoo:mobilenet_v2?classes=N --dataset "imagenet?path=DIR"` fine-tunes
the real pretrained weights on them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kiln.data.base import DataSplits, register
from kiln.data.images import IMAGE_SUFFIXES
from kiln.data.splits import ArrayDataset, choice, int_in, missing_package, stratified_split, user_path
from kiln.errors import KilnError, first_line

# torchvision's ImageNet statistics, and the TF-Lite recipe EfficientNet-Lite was trained with
# ((pixel - 127) / 128: kiln.models.zoo.imagenet.EfficientNetLite.MEAN/STD)
NORMS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
         "tf": ((127 / 255,) * 3, (128 / 255,) * 3)}
ACCEPTED = "an ImageFolder directory: one subfolder of PNG/JPG photos per class"


def read_photo(path: Path, size: int) -> np.ndarray:
    """RGB, shorter side resized to size * 256/224, centre crop size x size, uint8 HWC
    (torchvision's Resize(256) + CenterCrop(224) evaluation transform, for any size)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        short = round(size * 256 / 224)
        w, h = im.size
        scale = short / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


@register("imagenet", "classification",
          "Your own photos for the ImageNet zoo models (no ImageNet images ship offline: path= "
          "is required): an ImageFolder directory, resized (shorter side size*256/224), centre-"
          "cropped to size, normalised with norm=imagenet (torchvision's mean/std) or tf "
          "((x-127)/128, EfficientNet-Lite's); stratified seeded 80/10/10 split. x: 3xSIZExSIZE "
          "float32. Classes are the subfolder names, in sorted order.",
          "your files (path=DIR)", path=None, size=224, norm="imagenet")
def imagenet(seed: int = 0, path: str | None = None, size: int = 224, norm: str = "imagenet") -> DataSplits:
    int_in("imagenet", "size", size, 32, 512)
    choice("imagenet", "norm", norm, tuple(NORMS))
    if path is None:
        raise KilnError(f"imagenet: no ImageNet images ship offline; give imagenet?path=DIR, {ACCEPTED}")
    folder = Path(user_path("imagenet", path, ACCEPTED))
    if not folder.is_dir():
        raise KilnError(f"imagenet: {path} is not a directory; give {ACCEPTED}")
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise missing_package("imagenet", "pillow", "pillow", "install pillow") from None
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((folder / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    xs.append(read_photo(f, size))
                except Exception as exc:
                    raise KilnError(f"imagenet: cannot read image {f}: {first_line(exc)}") from None
                ys.append(label)
    if len(classes) < 2 or not xs:
        raise KilnError(f"imagenet: {path} has {len(xs)} images in {len(classes)} class folders; "
                        f"give {ACCEPTED} (at least 2 classes)")
    y = np.asarray(ys, dtype=np.int64)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMS[norm])
    splits = []
    for idx in stratified_split(y, seed):
        x = torch.from_numpy(np.stack([xs[i] for i in idx])).permute(0, 3, 1, 2).float() / 255
        splits.append(ArrayDataset(((x - mean) / std).contiguous(), torch.from_numpy(y[idx].copy())))
    return DataSplits("imagenet", "classification", *splits, num_classes=len(classes),
                      sample_shape=(3, size, size), source=f"{path}: {len(xs):,} photos in {len(classes)} classes",
                      info={"class_names": classes, "norm": norm, "seed": seed})

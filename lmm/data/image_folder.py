"""Image folders (PNG/JPEG, optionally labelled by class sub-folder) and AFHQ, centre-cropped, resized and kept
as uint8."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lmm.data.arrays import ImageData

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
AFHQ_RESOLUTION = 64

_AFHQ_SPLITS = {"train": "train", "test": "val"}


def _center_crop_resize(img, resolution: int):
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return img


def load_image_folder(
    root: str | Path, resolution: int, channels: int = 3, labels: bool = False
) -> ImageData:
    """PNG/JPEG files found recursively under root, centre-cropped and resized: uint8 (N, channels, res, res).

    With labels=True the class of a file is its first-level sub-folder (classes sorted by name).
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} (data.root) does not exist")
    if channels not in (1, 3):
        raise ValueError(f"image_folder channels={channels} (data.channels); valid: 1 (grey) or 3 (rgb)")
    if resolution <= 0:
        raise ValueError(f"image_folder needs data.resolution=N (the side images are resized to), got {resolution}")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise ValueError(f"image folder {root} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    classes: list[str] | None = None
    y = None
    if labels:
        top = [p.relative_to(root).parts for p in files]
        loose = [files[i] for i, parts in enumerate(top) if len(parts) < 2]
        if loose:
            raise ValueError(
                f"image_folder labels=True needs every image inside a class sub-folder of {root}; "
                f"{loose[0]} is not"
            )
        classes = sorted({parts[0] for parts in top})
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[parts[0]] for parts in top], dtype=torch.int64)
    mode = "L" if channels == 1 else "RGB"
    images = np.empty((len(files), channels, resolution, resolution), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                img = _center_crop_resize(img.convert(mode), resolution)
                arr = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from e
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        images[i] = arr.transpose(2, 0, 1)
    return ImageData(
        images=images,
        y=y,
        num_classes=len(classes) if classes else 0,
        name=f"image_folder-{root.name}",
        classes=classes,
    )


def load_afhq(
    root: str | Path, split: str = "train", resolution: int = 0, channels: int = 3, labels: bool = False
) -> ImageData:
    """AFHQ (or any class-folder tree) through load_image_folder: uint8 (N, channels, res, res), res 64 when 0.

    root is the AFHQ folder holding train/ and val/ (split train / test) or one class-folder tree (split train);
    with labels=True the classes are the sub-folders (cat, dog, wild).
    """
    if split not in _AFHQ_SPLITS:
        raise ValueError(f"afhq split={split!r} (data.split); valid: {sorted(_AFHQ_SPLITS)}")
    root = Path(root)
    folder = root / _AFHQ_SPLITS[split]
    if not folder.is_dir():
        if split != "train":
            raise FileNotFoundError(f"afhq split=test reads {folder}, which does not exist; set data.root to the "
                                    f"AFHQ folder holding train/ and val/")
        folder = root
    data = load_image_folder(folder, resolution or AFHQ_RESOLUTION, channels, labels)
    return replace(data, name=f"afhq-{split}")

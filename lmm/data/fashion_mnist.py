"""Fashion-MNIST from IDX files (optionally gzipped), kept as uint8."""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import torch

from lmm.data.arrays import ImageData

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

_IDX_MAGIC = {2049: 1, 2051: 3}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes: magic 2051 -> (N, H, W), 2049 -> (N,)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = bytearray(f.read())
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is too short ({len(raw)} bytes) to hold a header")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in _IDX_MAGIC:
        raise ValueError(
            f"IDX file {path} has magic number {magic}; expected 2051 (images) or 2049 (labels)"
        )
    ndim = _IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated inside its header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise ValueError(
            f"IDX file {path} has {len(raw)} bytes; its header (dims {dims}) implies {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {root / (stem + '.gz')} not found. Install it with "
        f"`apt-get install dataset-fashion-mnist` (files go to {FASHION_MNIST_ROOT}) "
        f"or set data.root=DIR to the directory holding the idx files"
    )


def load_fashion_mnist(root: str | Path | None = None, split: str = "train") -> ImageData:
    """Fashion-MNIST from idx(.gz) files: uint8 (60000 | 10000, 1, 28, 28), 10 classes."""
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"fashion_mnist split={split!r}; valid: {sorted(prefixes)}")
    root = Path(root if root is not None else FASHION_MNIST_ROOT)
    images_path = _idx_file(root, f"{prefixes[split]}-images-idx3-ubyte")
    labels_path = _idx_file(root, f"{prefixes[split]}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path} holds labels (1-D IDX), expected images (magic 2051)")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path} holds images (3-D IDX), expected labels (magic 2049)")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path} has label {int(labels.max())}; Fashion-MNIST labels are 0..9")
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageData(images=images[:, None], y=y, num_classes=10, name=f"fashion_mnist-{split}")

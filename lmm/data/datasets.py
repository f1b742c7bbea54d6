"""Datasets (digits, Fashion-MNIST idx files, 2-D toys, image folders) and the TensorSource batch source.

Every loader returns an `ImageData` with x float32 in [-1, 1] shaped (N, C, H, W), or (N, 2) for toys.
"""
from __future__ import annotations

import gzip
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TOY_KINDS = ("moons", "8gaussians", "checkerboard")

_IDX_MAGIC = {2049: 1, 2051: 3}


@dataclass
class ImageData:
    """x: (N, C, H, W) or (N, 2) float32 in [-1, 1] (toys roughly unit variance); y: (N,) int64 or None."""

    x: Tensor
    y: Tensor | None
    num_classes: int
    name: str
    classes: list[str] | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def tensors(self) -> dict[str, Tensor]:
        """{"x": x, "y": y} (without "y" when unlabelled), ready for TensorSource."""
        return {"x": self.x} if self.y is None else {"x": self.x, "y": self.y}


def load_digits() -> ImageData:
    """sklearn's 8x8 digits: (1797, 1, 8, 8), values 0..16 mapped by v/8 - 1, 10 classes."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    y = torch.from_numpy(d.target.astype(np.int64))
    return ImageData(x=x, y=y, num_classes=10, name="digits")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes: magic 2051 -> (N, H, W), 2049 -> (N,)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
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
    """Fashion-MNIST from idx(.gz) files: (60000 | 10000, 1, 28, 28) as uint8/127.5 - 1, 10 classes."""
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
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1).div_(127.5).sub_(1.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageData(x=x, y=y, num_classes=10, name=f"fashion_mnist-{split}")


def make_toy(kind: str = "moons", n: int = 10000, seed: int = 0) -> Tensor:
    """(n, 2) float32 samples of a 2-D toy distribution, each coordinate roughly unit variance."""
    if n <= 0:
        raise ValueError(f"toy n={n}; must be positive")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    if kind == "moons":
        from sklearn.datasets import make_moons

        x, _ = make_moons(n_samples=n, noise=0.05, random_state=seed)
        x = (x - np.array([0.5, 0.25])) / np.array([0.867, 0.497])
    elif kind == "8gaussians":
        std = 0.1
        radius = math.sqrt(2.0 * (1.0 - std**2))
        angles = rng.integers(0, 8, size=n) * (2 * math.pi / 8)
        centers = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        x = centers + std * rng.standard_normal((n, 2))
    elif kind == "checkerboard":
        a = rng.uniform(-2.0, 2.0, size=n)
        b = rng.uniform(0.0, 1.0, size=n) - 2.0 * rng.integers(0, 2, size=n) + np.floor(a) % 2
        x = np.stack([a, b], axis=1) * (math.sqrt(3.0) / 2.0)
    else:
        raise ValueError(f"toy kind={kind!r}; valid: {list(TOY_KINDS)}")
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


def load_toy(kind: str = "moons", n: int = 10000, seed: int = 0) -> ImageData:
    """A 2-D toy as ImageData: x (n, 2), unlabelled."""
    return ImageData(x=make_toy(kind, n, seed), y=None, num_classes=0, name=f"toy-{kind}")


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
    """PNG/JPEG files found recursively under root, centre-cropped and resized: (N, channels, res, res).

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
    x = torch.empty(len(files), channels, resolution, resolution, dtype=torch.float32)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                img = _center_crop_resize(img.convert(mode), resolution)
                arr = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from e
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        x[i] = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return ImageData(
        x=x,
        y=y,
        num_classes=len(classes) if classes else 0,
        name=f"image_folder-{root.name}",
        classes=classes,
    )


_LOADERS: dict[str, Callable[..., ImageData]] = {
    "digits": lambda root: load_digits(),
    "fashion_mnist": lambda root, split="train": load_fashion_mnist(root, split),
    "toy": lambda root, kind="moons", n=10000, seed=0: load_toy(kind, n, seed),
    "image_folder": lambda root, resolution, channels=3, labels=False: load_image_folder(
        _require_root(root), resolution, channels, labels
    ),
}


def _require_root(root: str | Path | None) -> str | Path:
    if root is None:
        raise ValueError("dataset image_folder needs a directory: set data.root=DIR")
    return root


def load_dataset(name: str, root: str | Path | None = None, **kw) -> ImageData:
    """Load a dataset by name: digits | fashion_mnist (split) | toy (kind, n, seed) |
    image_folder (resolution, channels, labels)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid: {sorted(_LOADERS)}")
    loader = _LOADERS[name]
    params = inspect.signature(loader).parameters
    valid = [p for p in params if p != "root"]
    unknown = sorted(set(kw) - set(valid))
    if unknown:
        raise ValueError(f"dataset {name!r} got unknown option(s) {unknown}; valid: {valid}")
    missing = [
        p for p in valid if params[p].default is inspect.Parameter.empty and p not in kw
    ]
    if missing:
        raise ValueError(f"dataset {name!r} needs option(s) {missing}")
    return loader(root, **kw)


def _epoch_seed(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


class TensorSource:
    """Deterministic batches from in-memory tensors sharing their first dim N.

    The sample stream is the concatenation of epoch permutations (epoch e permuted with a generator seeded
    by (seed, e)); the global batch at step s is stream[s*B*world : (s+1)*B*world] and rank r gets rows
    [r*B:(r+1)*B] of it, so the content depends only on (seed, step) and the global batch size.
    """

    def __init__(self, tensors: dict[str, Tensor], seed: int):
        if not tensors:
            raise ValueError("TensorSource needs at least one tensor")
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"TensorSource tensors differ in length: {sizes}")
        self.n = next(iter(sizes.values()))
        if self.n == 0:
            raise ValueError("TensorSource tensors are empty")
        if seed < 0:
            raise ValueError(f"TensorSource seed={seed}; must be >= 0")
        self.tensors = tensors
        self.seed = seed
        self._perms: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return self.n

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            perm = _epoch_seed(self.seed, 0, epoch).permutation(self.n)
            self._perms[epoch] = torch.from_numpy(perm)
        return self._perms[epoch]

    def indices(self, step: int, rank: int, world: int, batch_size: int) -> Tensor:
        """(batch_size,) int64 row indices of rank's slice of the global batch at step."""
        if not 0 <= rank < world or batch_size <= 0 or step < 0:
            raise ValueError(f"bad batch request step={step} rank={rank} world={world} batch_size={batch_size}")
        start = step * batch_size * world + rank * batch_size
        pos = torch.arange(start, start + batch_size, dtype=torch.int64)
        epochs = pos // self.n
        out = torch.empty(batch_size, dtype=torch.int64)
        for e in torch.unique(epochs).tolist():
            m = epochs == e
            out[m] = self._perm(e)[pos[m] - e * self.n]
        return out

    def batch(self, step: int, rank: int, world: int, batch_size: int) -> dict[str, Tensor]:
        """Rank's slice of the global batch at step: {key: (batch_size, ...)}."""
        idx = self.indices(step, rank, world, batch_size)
        return {k: v[idx] for k, v in self.tensors.items()}

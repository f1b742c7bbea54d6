"""Datasets by name: the registry of loaders behind load_dataset and its option checks.

Formats, one module each: digits, fashion_mnist (IDX files), cifar10 (python batches, archive or folder),
imagenet64 (.npz batches), image_folder (class-folder trees, AFHQ), toy (2-D points); all load as ImageData
(lmm.data.arrays).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from lmm.data.arrays import ImageData
from lmm.data.cifar10 import CIFAR10_ARCHIVE, CIFAR10_FOLDER, load_cifar10
from lmm.data.digits import load_digits
from lmm.data.fashion_mnist import load_fashion_mnist
from lmm.data.image_folder import load_afhq, load_image_folder
from lmm.data.imagenet64 import load_imagenet64
from lmm.data.toy import load_toy

_ROOT_HINTS = {
    "image_folder": "a directory: set data.root=DIR",
    "afhq": "a directory: set data.root=DIR (the AFHQ folder, holding train/ and val/)",
    "cifar10": f"data.root=PATH: {CIFAR10_ARCHIVE} or the extracted {CIFAR10_FOLDER} folder",
    "imagenet64": "data.root=DIR: the folder of train_data_batch_*.npz and val_data.npz",
}


def _require_root(name: str, root: str | Path | None) -> str | Path:
    if root is None:
        raise ValueError(f"dataset {name} needs {_ROOT_HINTS[name]}")
    return root


_LOADERS: dict[str, Callable[..., ImageData]] = {
    "digits": lambda root: load_digits(),
    "fashion_mnist": lambda root, split="train": load_fashion_mnist(root, split),
    "cifar10": lambda root, split="train": load_cifar10(_require_root("cifar10", root), split),
    "imagenet64": lambda root, split="train": load_imagenet64(_require_root("imagenet64", root), split),
    "toy": lambda root, kind="moons", n=10000, seed=0: load_toy(kind, n, seed),
    "image_folder": lambda root, resolution, channels=3, labels=False: load_image_folder(
        _require_root("image_folder", root), resolution, channels, labels
    ),
    "afhq": lambda root, split="train", resolution=0, channels=3, labels=False: load_afhq(
        _require_root("afhq", root), split, resolution, channels, labels
    ),
}


def load_dataset(name: str, root: str | Path | None = None, **kw) -> ImageData:
    """Load a dataset by name: digits | fashion_mnist (split) | cifar10 (split) | imagenet64 (split) |
    toy (kind, n, seed) | image_folder (resolution, channels, labels) | afhq (split, resolution, channels, labels)."""
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

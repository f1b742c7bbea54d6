"""The dataset a run config names (its data.* table): which datasets take a split or a folder's resolution,
channels and labels, the cut to data.n samples, and the checks against data.resolution / data.channels."""
from __future__ import annotations

from typing import Any

from lmm.data.arrays import ImageData, TensorSource
from lmm.data.datasets import load_dataset

_SPLIT_DATASETS = ("fashion_mnist", "cifar10", "imagenet64", "afhq")
_FOLDER_DATASETS = ("image_folder", "afhq")


def load_data(cfg: dict) -> ImageData:
    """The dataset of cfg["data"] as stored (uint8 images are converted per batch by `ImageData.source`), cut to
    its first data.n samples (views) when data.n > 0; refused when data.resolution / data.channels (when set)
    differ from the dataset's own."""
    d = cfg["data"]
    name = d["name"]
    kw: dict[str, Any] = {"split": d["split"]} if name in _SPLIT_DATASETS else {}
    if not kw and d["split"] != "train":
        raise ValueError(f"data.split / eval.split = {d['split']!r}: dataset '{name}' has only one split ('train')")
    if name == "toy":
        kw = {"kind": d["toy"], "n": d["n"] or 20_000, "seed": cfg["run"]["seed"]}
    elif name in _FOLDER_DATASETS:
        kw.update(resolution=d["resolution"], channels=d["channels"] or 3, labels=d["conditional"])
    data = load_dataset(name, root=d["root"] or None, **kw)
    if len(data.data_shape) == 3:
        c, h, _ = data.data_shape
        for key, want, have in (("resolution", d["resolution"], h), ("channels", d["channels"], c)):
            if want and want != have:
                raise ValueError(f"data.{key}={want}, but {data.name} has {have}; set data.{key}=0 (or {have})")
    if d["n"] and name != "toy":
        data = data.head(d["n"])
    return data


def num_classes(cfg: dict, data: ImageData) -> int:
    """The classes a model of this run is conditioned on: the dataset's when data.conditional, else 0."""
    return data.num_classes if cfg["data"]["conditional"] else 0


def real_source(cfg: dict, shape: tuple[int, ...], ncls: int) -> TensorSource:
    """Dataset images {"x": (B, *shape), "y": (B,) when ncls > 0} as a BatchSource (seed run.seed + 1), for loss
    terms that compare with real data; refused when the dataset's shape or classes differ from the pair store's."""
    data = load_data(cfg)
    if data.data_shape != tuple(shape) or (ncls and data.num_classes != ncls):
        raise ValueError(f"data.* ({data.name}: {data.data_shape}, {data.num_classes} classes) is not the "
                         f"data of the pair store ({tuple(shape)}, {ncls} classes)")
    return data.source(cfg["run"]["seed"] + 1, labels=ncls > 0)

"""Datasets, batch sources and the pair store."""
from lmm.data.datasets import ImageData, TensorSource, load_dataset, make_toy, read_idx
from lmm.data.images import save_image_grid, to_uint8
from lmm.data.pairs import (
    PairSource,
    PairsReport,
    PairStore,
    make_pairs,
    open_pairs,
    shard_seed,
)

__all__ = [
    "ImageData",
    "PairSource",
    "PairStore",
    "PairsReport",
    "TensorSource",
    "load_dataset",
    "make_pairs",
    "make_toy",
    "open_pairs",
    "read_idx",
    "save_image_grid",
    "shard_seed",
    "to_uint8",
]

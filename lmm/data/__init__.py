"""Datasets in their stored formats, the batches read from them and image helpers."""
from lmm.data.arrays import ImageData, TensorSource
from lmm.data.datasets import load_dataset
from lmm.data.fashion_mnist import read_idx
from lmm.data.images import save_image_grid, to_uint8
from lmm.data.toy import make_toy

__all__ = [
    "ImageData",
    "TensorSource",
    "load_dataset",
    "make_toy",
    "read_idx",
    "save_image_grid",
    "to_uint8",
]

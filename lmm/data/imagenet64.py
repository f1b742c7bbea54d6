"""Downsampled ImageNet 64x64 .npz batches, memory-mapped where stored uncompressed."""
from __future__ import annotations

import math
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from lmm.data.arrays import ChunkedArray, ImageData

IMAGENET64_CLASSES = 1000

_IMAGENET64_TRAIN = re.compile(r"train_data_batch_(\d+)\.npz")
_IMAGENET64_ROW = 3 * 64 * 64


def npz_memmap(path: str | Path, key: str) -> np.ndarray | None:
    """Array `key` of an .npz as a read-only np.memmap when stored uncompressed (C order, .npy format 1.0/2.0);
    None when it must be read into memory (compressed member, Fortran order, other .npy versions)."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: bad zip local header for member {key}.npy")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        version = np.lib.format.read_magic(f)
        if version not in readers:
            return None
        shape, fortran, dtype = readers[version](f)
        offset = f.tell()
    if fortran or dtype.hasobject:
        return None
    if offset - start + math.prod(shape) * dtype.itemsize != info.file_size:
        raise ValueError(f"{path}: member {key}.npy holds {info.file_size} bytes, its header implies "
                         f"{offset - start + math.prod(shape) * dtype.itemsize}")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _imagenet64_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One downsampled-ImageNet .npz batch -> (uint8 (n, 3, 64, 64) view of `data`, int64 (n,) labels 0..999)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not {"data", "labels"} <= set(npz.files):
                raise KeyError(f"arrays {npz.files}, expected 'data' and 'labels'")
            labels = npz["labels"]
            data = npz_memmap(path, "data")
            data = npz["data"] if data is None else data
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a readable downsampled-ImageNet batch ({e}); replace it or set data.root "
                         f"to another folder") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _IMAGENET64_ROW:
        raise ValueError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (n, {_IMAGENET64_ROW}) "
                         f"(64x64 RGB, CHW); is data.root the ImageNet 64x64 folder?")
    if labels.shape != (len(data),) or (labels.size and (labels.dtype.kind not in "iu" or labels.min() < 1
                                                         or labels.max() > IMAGENET64_CLASSES)):
        raise ValueError(f"{path}: 'labels' is not {len(data)} ints in 1..{IMAGENET64_CLASSES}")
    return data.reshape(-1, 3, 64, 64), labels.astype(np.int64) - 1


def _imagenet64_files(root: Path, split: str) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet64 folder {root} (data.root) does not exist")
    if split == "test":
        if not (root / "val_data.npz").is_file():
            raise FileNotFoundError(f"{root / 'val_data.npz'} not found; set data.root to the folder of the "
                                    f"downsampled ImageNet 64x64 .npz batches")
        return [root / "val_data.npz"]
    numbered = {int(m[1]): p for p in root.iterdir() if (m := _IMAGENET64_TRAIN.fullmatch(p.name))}
    if not numbered:
        raise FileNotFoundError(f"no train_data_batch_1.npz ... in {root}; set data.root to the folder of the "
                                f"downsampled ImageNet 64x64 .npz batches")
    missing = sorted(set(range(1, max(numbered) + 1)) - set(numbered))
    if missing:
        raise FileNotFoundError(f"{root / f'train_data_batch_{missing[0]}.npz'} not found (batches 1..{max(numbered)} "
                                f"expected); complete the folder set as data.root")
    return [numbered[k] for k in sorted(numbered)]


def load_imagenet64(root: str | Path, split: str = "train") -> ImageData:
    """Downsampled ImageNet 64x64: train_data_batch_*.npz (train) or val_data.npz (test) under root, images memory-
    mapped where stored uncompressed: uint8 (N, 3, 64, 64) (a ChunkedArray over several files), labels 0..999."""
    if split not in ("train", "test"):
        raise ValueError(f"imagenet64 split={split!r} (data.split); valid: ['test', 'train']")
    batches = [_imagenet64_batch(p) for p in _imagenet64_files(Path(root), split)]
    images = batches[0][0] if len(batches) == 1 else ChunkedArray([b[0] for b in batches])
    y = torch.from_numpy(np.concatenate([b[1] for b in batches]))
    return ImageData(images=images, y=y, num_classes=IMAGENET64_CLASSES, name=f"imagenet64-{split}")

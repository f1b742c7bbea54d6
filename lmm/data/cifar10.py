"""CIFAR-10 python batches, read from the archive or the extracted folder without running pickled code."""
from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from lmm.data.arrays import ImageData

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


_PICKLE_GLOBALS: dict[tuple[str, str], Callable] = {
    ("numpy.core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler of dicts, lists, numbers, strings and numpy arrays; any other global is refused."""

    def __init__(self, raw: bytes):
        super().__init__(io.BytesIO(raw), encoding="bytes")

    def find_class(self, module: str, name: str) -> Callable:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} refused (only numpy arrays are read)")
        return _PICKLE_GLOBALS[module, name]


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """_codecs.encode as Python 3 writes bytes into protocol-2 pickles: latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} refused (only latin1)")
    return text.encode("latin1")


def _int_array(value: object) -> np.ndarray | None:
    """value (a list or ndarray of integers) as a 1-D integer array, else None."""
    if not isinstance(value, (list, np.ndarray)):
        return None
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        return None
    return arr if arr.ndim == 1 and arr.dtype.kind in "iu" else None


def _cifar10_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch (a pickled dict) -> (uint8 (n, 3, 32, 32), int64 (n,))."""
    try:
        batch = _ArrayUnpickler(raw).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            struct.error) as e:
        raise ValueError(f"{where}: not a readable CIFAR-10 batch ({e}); replace the file or point data.root "
                         f"at an intact {CIFAR10_ARCHIVE}") from e
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= batch.keys():
        raise ValueError(f"{where}: not a CIFAR-10 batch (a dict with b'data' and b'labels'); check data.root")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{where}: b'data' is not a uint8 (n, 3072) array; not a CIFAR-10 batch (data.root)")
    labels = _int_array(batch[b"labels"])
    if labels is None or labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"{where}: b'labels' is not {len(data)} ints in 0..9; not a CIFAR-10 batch (data.root)")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar10_raw(root: Path, names: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """(where, bytes) of each batch file, read from the archive or the extracted folder found at root."""
    known = ("batches.meta", *_CIFAR10_BATCHES["train"], *_CIFAR10_BATCHES["test"])
    folder = next((f for f in (root, root / CIFAR10_FOLDER) if any((f / n).is_file() for n in known)), None)
    if folder is not None:
        for n in names:
            if not (folder / n).is_file():
                raise FileNotFoundError(f"CIFAR-10 batch {folder / n} not found; set data.root to a complete "
                                        f"{CIFAR10_FOLDER} folder or to {CIFAR10_ARCHIVE}")
        return [(str(folder / n), (folder / n).read_bytes()) for n in names]
    archive = root if root.is_file() else root / CIFAR10_ARCHIVE
    if not archive.is_file():
        raise FileNotFoundError(f"CIFAR-10 not found at {root}: set data.root to {CIFAR10_ARCHIVE}, the extracted "
                                f"{CIFAR10_FOLDER} folder, or a folder holding either "
                                f"(https://www.cs.toronto.edu/~kriz/{CIFAR10_ARCHIVE})")
    found: dict[str, tuple[str, bytes]] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                base = PurePosixPath(member.name).name
                if member.isfile() and base in names and base not in found:
                    found[base] = (f"{archive}:{member.name}", tar.extractfile(member).read())
                if len(found) == len(names):
                    break
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{archive}: damaged archive ({e}); download it again or set data.root to the "
                         f"extracted {CIFAR10_FOLDER} folder") from e
    for n in names:
        if n not in found:
            raise FileNotFoundError(f"{archive} has no member {CIFAR10_FOLDER}/{n}; is data.root the CIFAR-10 "
                                    f"python archive ({CIFAR10_ARCHIVE})?")
    return [found[n] for n in names]


def load_cifar10(root: str | Path, split: str = "train") -> ImageData:
    """CIFAR-10 python batches, read from cifar-10-python.tar.gz (not extracted) or the cifar-10-batches-py folder,
    without running pickled code: uint8 (50000 | 10000, 3, 32, 32), 10 classes."""
    if split not in _CIFAR10_BATCHES:
        raise ValueError(f"cifar10 split={split!r} (data.split); valid: {sorted(_CIFAR10_BATCHES)}")
    batches = [_cifar10_batch(raw, where) for where, raw in _cifar10_raw(Path(root), _CIFAR10_BATCHES[split])]
    images = np.concatenate([b[0] for b in batches])
    y = torch.from_numpy(np.concatenate([b[1] for b in batches]))
    return ImageData(images=images, y=y, num_classes=10, name=f"cifar10-{split}", classes=list(CIFAR10_CLASSES))

"""Datasets in their stored formats and the TensorSource batch source.

Loaders: digits, Fashion-MNIST idx files, CIFAR-10 python batches (archive or folder), downsampled ImageNet 64x64
.npz batches, image folders (AFHQ), 2-D toys. Image sets are kept as uint8 (N, C, H, W) (in RAM, or memory-mapped
from uncompressed .npz members) and converted to float32 v/127.5 - 1 one batch at a time; digits (N, 1, 8, 8) and
toys (N, 2) are kept as float32 in model units.
"""
from __future__ import annotations

import gzip
import inspect
import io
import math
import pickle
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import Tensor

from lmm.data.images import to_uint8

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TOY_KINDS = ("moons", "8gaussians", "checkerboard")
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGENET64_CLASSES = 1000
AFHQ_RESOLUTION = 64

_IDX_MAGIC = {2049: 1, 2051: 3}
_CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_IMAGENET64_TRAIN = re.compile(r"train_data_batch_(\d+)\.npz")
_IMAGENET64_ROW = 3 * 64 * 64
_AFHQ_SPLITS = {"train": "train", "test": "val"}


class ChunkedArray:
    """Arrays (n_i, *S) of one dtype read as one (sum n_i, *S) array without joining them (one memmap per file).

    As with an ndarray, a slice (step 1) and `transpose` (axis 0 kept first) are views; an int or a 1-D int array
    gives a new ndarray of just those rows; np.asarray joins every row (a copy).
    """

    def __init__(self, parts: list[np.ndarray]):
        if not parts or len({(p.shape[1:], p.dtype) for p in parts}) != 1:
            raise ValueError(f"ChunkedArray needs arrays of one dtype and row shape, got "
                             f"{[(p.dtype, p.shape) for p in parts]}")
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.dtype = parts[0].dtype
        self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray | ChunkedArray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError(f"ChunkedArray slices take step 1, got {step}")
            parts = [p[max(start - off, 0) : stop - off] for p, off in zip(self.parts, self.offsets)
                     if start - off < len(p) and stop > off]
            return ChunkedArray(parts or [self.parts[0][:0]])
        idx = np.asarray(key)
        if idx.dtype.kind not in "iu" or idx.ndim > 1:
            raise IndexError(f"ChunkedArray takes a slice, an int or a 1-D int array, got {key!r}")
        flat = np.where(idx < 0, idx + len(self), idx).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        which = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty((flat.size, *self.shape[1:]), self.dtype)
        for k in np.unique(which):
            m = which == k
            out[m] = self.parts[k][flat[m] - self.offsets[k]]
        return out if idx.ndim else out[0]

    def transpose(self, *axes: int) -> ChunkedArray:
        if axes[0] != 0:
            raise ValueError(f"ChunkedArray.transpose keeps the row axis first, got {axes}")
        return ChunkedArray([p.transpose(*axes) for p in self.parts])

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a ChunkedArray cannot be one ndarray without a copy")
        joined = np.concatenate(self.parts)
        return joined if dtype is None else joined.astype(dtype, copy=False)


def model_rows(values: Tensor | np.ndarray | ChunkedArray, idx: Tensor | slice,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """values[idx] (idx: a tensor of indices or a slice) as a tensor; uint8 rows become v/127.5 - 1 in `dtype`,
    other rows keep their dtype."""
    if not isinstance(values, Tensor) and isinstance(idx, Tensor):
        idx = idx.numpy()
    rows = values[idx] if isinstance(values, Tensor) else torch.from_numpy(np.asarray(values[idx]))
    return rows.to(dtype).div_(127.5).sub_(1.0) if rows.dtype == torch.uint8 else rows


@dataclass
class ImageData:
    """A dataset as stored, converted to model units per batch (`source`).

    images: uint8 (N, C, H, W) ndarray, np.memmap or ChunkedArray (served as v/127.5 - 1), or a float32 Tensor
    already in model units: (N, C, H, W) in [-1, 1] (digits) or (N, 2) (toys). y: (N,) int64 or None.
    """

    images: np.ndarray | ChunkedArray | Tensor
    y: Tensor | None
    num_classes: int
    name: str
    classes: list[str] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def x(self) -> Tensor:
        """(N, *data_shape) float32 in model units; for uint8 images a float32 copy of the whole set (small sets:
        training reads batches through `source`)."""
        if isinstance(self.images, Tensor):
            return self.images
        return model_rows(self.images, slice(None))

    def uint8_nhwc(self) -> np.ndarray | ChunkedArray:
        """(N, H, W, C) uint8: a view of uint8 images, or to_uint8 of float ones (digits)."""
        if len(self.data_shape) != 3:
            raise ValueError(f"{self.name} holds points {self.data_shape}, not images")
        if isinstance(self.images, Tensor):
            return to_uint8(self.images)
        return self.images.transpose(0, 2, 3, 1)

    def head(self, n: int) -> ImageData:
        """The first n samples, as views of these arrays."""
        return replace(self, images=self.images[:n], y=None if self.y is None else self.y[:n])

    def tensors(self) -> dict[str, Tensor | np.ndarray | ChunkedArray]:
        """{"x": images, "y": y} (without "y" when unlabelled), ready for TensorSource."""
        return {"x": self.images} if self.y is None else {"x": self.images, "y": self.y}

    def source(self, seed: int, labels: bool = True) -> TensorSource:
        """Batches {"x": (B, *data_shape) float32, "y": (B,) int64 when labelled and `labels`} (TensorSource)."""
        tensors = self.tensors()
        if not labels:
            tensors.pop("y", None)
        return TensorSource(tensors, seed)


def load_digits() -> ImageData:
    """sklearn's 8x8 digits: float32 (1797, 1, 8, 8), values 0..16 mapped by v/8 - 1, 10 classes."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    y = torch.from_numpy(d.target.astype(np.int64))
    return ImageData(images=x, y=y, num_classes=10, name="digits")


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
    """A 2-D toy as ImageData: float32 (n, 2), unlabelled."""
    return ImageData(images=make_toy(kind, n, seed), y=None, num_classes=0, name=f"toy-{kind}")


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


def _epoch_seed(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


class TensorSource:
    """Deterministic batches from arrays sharing their first dim N: tensors, ndarrays, np.memmaps or ChunkedArrays.

    Only a batch's rows are read; uint8 rows are served as float32 v/127.5 - 1, other dtypes as they are.

    The sample stream is the concatenation of epoch permutations (epoch e permuted with a generator seeded
    by (seed, e)); the global batch at step s is stream[s*B*world : (s+1)*B*world] and rank r gets rows
    [r*B:(r+1)*B] of it, so the content depends only on (seed, step) and the global batch size.
    """

    def __init__(self, tensors: dict[str, Tensor | np.ndarray | ChunkedArray], seed: int):
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
        return {k: model_rows(v, idx) for k, v in self.tensors.items()}

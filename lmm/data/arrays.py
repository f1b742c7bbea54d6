"""Datasets as stored arrays and the batches read from them.

ImageData holds a dataset as its loader produced it: uint8 (N, C, H, W) images (in RAM, memory-mapped, or a
ChunkedArray over several files) converted to float32 v/127.5 - 1 one batch at a time (model_rows), or float32
data already in model units (digits (N, 1, 8, 8), toys (N, 2)). TensorSource serves deterministic batches of it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from lmm.data.images import to_uint8


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


def stored_rows(values: Tensor | np.ndarray | ChunkedArray, idx: Tensor | slice) -> Tensor:
    """values[idx] (idx: a tensor of indices or a slice) as a tensor of the stored dtype."""
    if not isinstance(values, Tensor) and isinstance(idx, Tensor):
        idx = idx.numpy()
    return values[idx] if isinstance(values, Tensor) else torch.from_numpy(np.asarray(values[idx]))


def uint8_to_model(rows: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 rows as v/127.5 - 1 in `dtype` (on their device); rows of another dtype as they are."""
    return rows.to(dtype).div_(127.5).sub_(1.0) if rows.dtype == torch.uint8 else rows


def model_rows(values: Tensor | np.ndarray | ChunkedArray, idx: Tensor | slice,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """values[idx] (idx: a tensor of indices or a slice) as a tensor; uint8 rows become v/127.5 - 1 in `dtype`,
    other rows keep their dtype."""
    return uint8_to_model(stored_rows(values, idx), dtype)


def to_model_units(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A batch of stored dtypes (a BatchSource's raw_batch) in model units: uint8 images v/127.5 - 1 and other
    floating tensors as float32; integer tensors (labels) as they are."""
    return {k: v.float() if v.is_floating_point() else uint8_to_model(v) for k, v in batch.items()}


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

    def raw_batch(self, step: int, rank: int, world: int, batch_size: int) -> dict[str, Tensor]:
        """`batch` in the stored dtypes (uint8 images as they are; to_model_units converts it), so that a GPU
        run uploads a quarter of the bytes and converts on the device."""
        idx = self.indices(step, rank, world, batch_size)
        return {k: stored_rows(v, idx) for k, v in self.tensors.items()}

    def batch(self, step: int, rank: int, world: int, batch_size: int) -> dict[str, Tensor]:
        """Rank's slice of the global batch at step: {key: (batch_size, ...)}."""
        return to_model_units(self.raw_batch(step, rank, world, batch_size))

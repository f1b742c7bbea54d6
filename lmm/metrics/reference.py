"""Reference feature statistics: compute, cache to .npz (atomically), and load with provenance checks; and read
NVlabs EDM's reference files (fid.py `ref`: an .npz holding only mu and sigma of Inception-v3 pool3 features)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from torch import Tensor

from lmm.dist import shard
from lmm.io import atomic_path
from lmm.metrics.features import FeatureExtractor
from lmm.metrics.frechet import FeatureStats

FORMAT_VERSION = 2
EDM_FIELDS = ("mu", "sigma")


def hash_images(images: Tensor | np.ndarray) -> str:
    """sha256 of uint8 images (N, H, W, C): the shape as text, then the raw bytes in C order, read in chunks of
    rows so that a memory-mapped or chunked array is never copied whole."""
    arr = images.detach().cpu().numpy() if isinstance(images, Tensor) else images
    if arr.dtype != np.uint8:
        raise TypeError(f"hash_images: images must be uint8, got dtype {arr.dtype}")
    h = hashlib.sha256(f"uint8{tuple(arr.shape)}".encode())
    for start in range(0, arr.shape[0], 4096):
        h.update(np.ascontiguousarray(arr[start:start + 4096]).tobytes())
    return h.hexdigest()


def compute_stats(extractor: FeatureExtractor, images: Tensor | np.ndarray, *,
                  keep_features: bool = False) -> FeatureStats:
    """Feature statistics of uint8 images (N, H, W, C), streamed one extractor batch at a time.

    Under torchrun every rank must call it with the same images: each extracts a contiguous share and
    all receive the statistics (and kept features, in image order) of the whole set.
    """
    mine = shard(images.shape[0])
    stats = FeatureStats(dim=None, keep_features=keep_features)
    for feats in extractor.iter_features(images[mine.start:mine.stop]):
        stats.add(feats)
    return stats.all_gather()


def _identity(extractor: FeatureExtractor) -> dict[str, str]:
    return {"extractor": extractor.name, "spec": extractor.spec, "network_hash": extractor.file_hash,
            "impl": extractor.impl}


def save_stats(path: str | Path, stats: FeatureStats, meta: dict, *, extractor: FeatureExtractor,
               data_hash: str) -> None:
    """Write stats (+ features if kept) with extractor identity, data hash and ``meta`` (JSON) to .npz atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "n": np.int64(stats.n),
              "format": np.int64(FORMAT_VERSION), "data_hash": np.str_(data_hash),
              "meta": np.str_(json.dumps(meta, sort_keys=True))}
    arrays.update({k: np.str_(v) for k, v in _identity(extractor).items()})
    if stats.features is not None:
        arrays["features"] = stats.features.numpy()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


@contextlib.contextmanager
def _stats_file(path: Path) -> Iterator[Any]:
    """The opened .npz of a stats cache; FileNotFoundError / ValueError naming the file when it is missing, not an
    .npz, or lacks a field read from it."""
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file not found: {path}")
    what = ("a reference statistics file (an .npz that lmm eval --ref-cache writes, or one of EDM's fid.py ref with "
            "mu and sigma)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not {what}")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: unreadable .npz ({err}); expected {what}") from None
    with z:
        try:
            yield z
        except KeyError as err:
            raise ValueError(f"{path}: no field {err}; expected {what}") from None


def read_meta(path: str | Path) -> dict:
    """The ``meta`` dict stored in a stats cache, plus its identity fields."""
    with _stats_file(Path(path)) as z:
        out = json.loads(str(z["meta"]))
        out.update({k: str(z[k]) for k in ("extractor", "spec", "network_hash", "impl", "data_hash")})
        out["n"] = int(z["n"])
    return out


def load_stats(path: str | Path, extractor: FeatureExtractor, data_hash: str | None = None) -> FeatureStats:
    """Load a cache, refusing (ValueError naming file and field) one of another format version or made by another
    extractor, network file, preprocessing, implementation (extractor.impl) or (when ``data_hash`` is given) data."""
    path = Path(path)
    with _stats_file(path) as z:
        if sorted(z.files) == sorted(EDM_FIELDS):
            raise ValueError(f"{path}: EDM reference statistics (mu, sigma alone) say nothing of the network or data "
                             "they came from, so they cannot be checked as a cache; pass them to lmm eval --ref")
        if "format" not in z or int(z["format"]) != FORMAT_VERSION:
            raise ValueError(f"{path}: field 'format' is missing or not {FORMAT_VERSION}; "
                             "recompute the reference stats")
        expected = _identity(extractor)
        if data_hash is not None:
            expected["data_hash"] = data_hash
        for field, want in expected.items():
            got = str(z[field])
            if got != want:
                raise ValueError(f"{path}: field '{field}' is {got!r} but the current run has {want!r}; "
                                 "the cache was made with another extractor/implementation/network/data: delete it or "
                                 "recompute")
        features = z["features"] if "features" in z else None
        return FeatureStats.from_moments(z["mu"], z["sigma"], int(z["n"]), features=features)


def is_edm_stats(path: str | Path) -> bool:
    """Whether ``path`` is an .npz in EDM's reference layout: ``np.savez(f, mu=mu, sigma=sigma)``, nothing else."""
    with _stats_file(Path(path)) as z:
        return sorted(z.files) == sorted(EDM_FIELDS)


def load_edm_stats(path: str | Path, dim: int) -> FeatureStats:
    """The mu (dim,) and sigma (dim, dim) of an EDM reference file as statistics without a count (``n`` None);
    ValueError naming the file when either is not finite floats of that shape."""
    path = Path(path)
    with _stats_file(path) as z:
        arrays = {name: z[name] for name in EDM_FIELDS}
    for (name, arr), shape in zip(arrays.items(), ((dim,), (dim, dim))):
        if arr.dtype.kind != "f" or arr.shape != shape:
            raise ValueError(f"{path}: EDM reference field '{name}' is {arr.dtype} {arr.shape}, but features of "
                             f"dimension {dim} need float {shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{path}: EDM reference field '{name}' holds non-finite values")
    return FeatureStats.from_moments(arrays["mu"], arrays["sigma"], None)

"""Reading a pair store: open_pairs, the PairStore view and the streaming PairSource batches."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from lmm.data.arrays import to_model_units
from lmm.pairs.format import (
    FORMAT_VERSION,
    MANIFEST,
    collect_records,
    header_of,
    meta_sha256,
    read_json,
    shard_count,
    shard_name,
    shard_problem,
)


class PairStore:
    """A read view of a pair store directory (see open_pairs)."""

    def __init__(self, store_dir: Path, header: dict, records: dict[int, dict]):
        self.dir = store_dir
        self.header = header
        self.records = records

    @property
    def manifest(self) -> dict:
        return {**self.header, "n_shards": self.num_shards, "shards": self.shards}

    @property
    def shards(self) -> list[dict]:
        return [self.records[k] for k in sorted(self.records)]

    @property
    def num_shards(self) -> int:
        return shard_count(self.header)

    @property
    def complete(self) -> bool:
        return len(self.records) == self.num_shards

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.header["data_shape"])

    @property
    def num_classes(self) -> int:
        return self.header["num_classes"]

    @property
    def dtype(self) -> str:
        return self.header["dtype"]

    def __len__(self) -> int:
        return sum(r["n"] for r in self.records.values())

    def shard_path(self, index: int) -> Path:
        return self.dir / shard_name(index)

    def load_shard(self, index: int) -> dict[str, Tensor]:
        """{"z": (n, *data_shape), "x1": (n, *data_shape)} in the store dtype, "y": (n,) int64 if labelled."""
        if index not in self.records:
            raise KeyError(f"shard {index} of {self.dir} has not been generated")
        path = self.shard_path(index)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read shard {path}: {e}") from e
        n = self.records[index]["n"]
        want = {"z": (n, *self.data_shape), "x1": (n, *self.data_shape)}
        if self.num_classes > 0:
            want["y"] = (n,)
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != want:
            raise ValueError(f"shard {path} holds tensors {got}; expected {want}")
        return tensors

    def iter_shards(self) -> Iterator[tuple[int, dict[str, Tensor]]]:
        for index in sorted(self.records):
            yield index, self.load_shard(index)

    def verify(self) -> None:
        """Check every recorded shard's sha256; raise ValueError naming the first bad shard file."""
        for index in sorted(self.records):
            problem = shard_problem(self.shard_path(index), self.records[index])
            if problem:
                raise ValueError(problem)


def open_pairs(store_dir: str | Path, verify: bool = True, allow_incomplete: bool = False) -> PairStore:
    """Open a pair store; verify=True checks every shard's sha256. An incomplete store raises unless allowed."""
    store = Path(store_dir)
    manifest_path = store / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"no pair store at {store}: {manifest_path} is missing; create it with `lmm pairs` (or pass the store's folder)"
        )
    manifest = read_json(manifest_path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path} has format_version {manifest.get('format_version')!r}; this code reads {FORMAT_VERSION}"
        )
    header = header_of(manifest)
    meta_sha = meta_sha256(header)
    records = collect_records(store, manifest, meta_sha, shard_count(header))
    pairs = PairStore(store, header, records)
    if not pairs.complete and not allow_incomplete:
        missing = [k for k in range(pairs.num_shards) if k not in records]
        raise ValueError(
            f"pair store {store} is incomplete: {len(missing)} of {pairs.num_shards} shards missing "
            f"(first {store / shard_name(missing[0])}); rerun `lmm pairs` (make_pairs) with the same settings to finish it"
        )
    if verify:
        pairs.verify()
    return pairs


class PairSource:
    """Deterministic batches {"z", "x1" float32, "y" int64 if labelled} streamed from a pair store.

    Epoch e permutes the shards with a generator seeded by (seed, e), groups them into windows of `window`
    shards and permutes the samples inside each window (seeded by (seed, e, w)); epochs follow each other
    seamlessly. The global batch at step s is stream[s*B*world : (s+1)*B*world], rank r gets rows
    [r*B:(r+1)*B]. Two windows are held in memory (two buffers of window * shard_size pairs): the one batches
    come from and the next, read by a background thread meanwhile (a store of at most `window` shards is read
    once).
    """

    def __init__(self, store_dir: str | Path, seed: int, window: int = 4, verify: bool = True):
        if window <= 0:
            raise ValueError(f"PairSource window={window}; must be positive")
        if seed < 0:
            raise ValueError(f"PairSource seed={seed}; must be >= 0")
        self.store = open_pairs(store_dir, verify=verify)
        self.seed = seed
        self.window = window
        self.n = len(self.store)
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._order = np.empty(0, dtype=np.int64)
        self._starts = np.empty(0, dtype=np.int64)
        self._win_key: tuple[int, int] | None = None
        self._bufs: list[dict[str, Tensor]] = [{}, {}]
        self._buf_shards: list[list[int]] = [[], []]
        self._current = 0
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="lmm-pair-window")
        self._next: tuple[list[int], Future] | None = None
        self._win_data: dict[str, Tensor] = {}
        self._win_perm = torch.empty(0, dtype=torch.int64)

    def __len__(self) -> int:
        return self.n

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.store.data_shape

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, window start offsets) of `epoch` (the last two epochs' kept)."""
        if epoch not in self._layouts:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0, epoch]))
            order = rng.permutation(self.store.num_shards)
            sizes = [self.store.records[int(k)]["n"] for k in order]
            per_window = [sum(sizes[i : i + self.window]) for i in range(0, len(sizes), self.window)]
            self._layouts = {e: v for e, v in self._layouts.items() if e == epoch - 1}
            self._layouts[epoch] = order, np.concatenate([[0], np.cumsum(per_window)]).astype(np.int64)
        return self._layouts[epoch]

    def _layout(self, epoch: int) -> None:
        self._order, self._starts = self._epoch_layout(epoch)

    def _window_shards(self, epoch: int, w: int) -> list[int]:
        order, _ = self._epoch_layout(epoch)
        return sorted(int(k) for k in order[w * self.window : (w + 1) * self.window])

    def _load_window(self, epoch: int, w: int) -> None:
        """Make window w of `epoch` the current one: its shards (in index order) in a buffer (the one the
        background read filled, else read now) and its permutation; then start reading the next window into the
        other buffer."""
        if self._win_key == (epoch, w):
            return
        self._win_key = None
        shards = self._window_shards(epoch, w)
        if self._next is not None:
            self._next[1].result()
            self._next = None
        if shards not in self._buf_shards:
            self._fill_buffer(1 - self._current, shards)
        self._current = self._buf_shards.index(shards)
        size = int(self._starts[w + 1] - self._starts[w])
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1, epoch, w]))
        self._win_perm = torch.from_numpy(rng.permutation(size))
        self._win_data = {key: t[:size] for key, t in self._bufs[self._current].items()}
        self._win_key = (epoch, w)
        following = (epoch, w + 1) if w + 2 < len(self._starts) else (epoch + 1, 0)
        upcoming = self._window_shards(*following)
        if upcoming not in self._buf_shards:
            self._next = upcoming, self._reader.submit(self._fill_buffer, 1 - self._current, upcoming)

    def _fill_buffer(self, index: int, shards: list[int]) -> None:
        """Read `shards` into buffer `index` (allocated at window * shard_size rows on first use)."""
        self._buf_shards[index] = []
        buf = self._bufs[index]
        offset = 0
        for k in shards:
            part = self.store.load_shard(k)
            if not buf:
                capacity = self.window * self.store.header["shard_size"]
                buf.update({key: torch.empty((capacity, *t.shape[1:]), dtype=t.dtype) for key, t in part.items()})
            for key, t in part.items():
                buf[key][offset : offset + t.shape[0]] = t
            offset += part["z"].shape[0]
            del part
        self._buf_shards[index] = shards

    def raw_batch(self, step: int, rank: int, world: int, batch_size: int) -> dict[str, Tensor]:
        """`batch` in the store's dtype (lmm.data.arrays.to_model_units converts it), for a GPU run to upload
        float16 stores at half the bytes and convert on the device."""
        if not 0 <= rank < world or batch_size <= 0 or step < 0:
            raise ValueError(f"bad batch request step={step} rank={rank} world={world} batch_size={batch_size}")
        pos = step * batch_size * world + rank * batch_size
        end = pos + batch_size
        parts: dict[str, list[Tensor]] = {}
        while pos < end:
            epoch, off = divmod(pos, self.n)
            self._layout(epoch)
            w = int(np.searchsorted(self._starts, off, side="right")) - 1
            stop = min(end, epoch * self.n + int(self._starts[w + 1]))
            self._load_window(epoch, w)
            lo = off - int(self._starts[w])
            rows = self._win_perm[lo : lo + stop - pos]
            for key, t in self._win_data.items():
                parts.setdefault(key, []).append(t[rows])
            pos = stop
        return {key: v[0] if len(v) == 1 else torch.cat(v) for key, v in parts.items()}

    def batch(self, step: int, rank: int, world: int, batch_size: int) -> dict[str, Tensor]:
        """Rank's slice of the global batch at step: z, x1 (batch_size, *data_shape) float32, y (batch_size,)."""
        return to_model_units(self.raw_batch(step, rank, world, batch_size))

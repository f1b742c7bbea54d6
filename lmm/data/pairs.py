"""The pair store: (z, x1) pairs from a teacher, sharded, resumable, checksummed and reproducible from seeds.

Layout of a store directory:
  manifest.json            header (teacher, solver, steps, grid, dtype, data_shape, ... , seed) + shard records
  shard-00007.safetensors  tensors "z" (n, *data_shape), "x1" (n, *data_shape), optional "y" (n,) int64
  shard-00007.json         sidecar record {index, seed, n, sha256, meta_sha256}, written after its shard

Sidecars are the source of truth for completed shards, so ranks running in parallel never overwrite each
other's records; the manifest's shard list is assembled from them.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lmm.io import atomic_path, file_sha256, save_json, temp_files
from lmm.progress import Progress, progress_bar

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}
_LAYOUT_KEYS = ("data_shape", "num_classes", "dtype", "n_pairs", "shard_size", "seed")
_DERIVED_KEYS = ("n_shards", "shards")
RESERVED_KEYS = ("format_version", *_LAYOUT_KEYS, *_DERIVED_KEYS)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def sidecar_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def shard_seed(base_seed: int, index: int) -> int:
    """63-bit seed of shard `index`, derived from (base_seed, index) with numpy's SeedSequence."""
    state = np.random.SeedSequence([base_seed, index]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _first_diff(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                return sub, old.get(key, "<missing>"), new.get(key, "<missing>")
            d = _first_diff(old[key], new[key], sub)
            if d:
                return d
        return None
    return None if old == new else (path, old, new)


def _identity(header: dict) -> dict:
    """The header without where things were (meta["teacher"]["path"]): a store copied or moved with its run
    folder still belongs to the same teacher, which meta["teacher"]["sha256"] identifies."""
    out = json.loads(json.dumps(header))
    if isinstance(out.get("teacher"), dict):
        out["teacher"].pop("path", None)
    return out


def _header_of(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in _DERIVED_KEYS}


def _n_shards(header: dict) -> int:
    return math.ceil(header["n_pairs"] / header["shard_size"])


def _shard_len(header: dict, index: int) -> int:
    return min(header["shard_size"], header["n_pairs"] - index * header["shard_size"])


def _collect_records(store: Path, manifest: dict | None, meta_sha: str, n_shards: int) -> dict[int, dict]:
    """Completed shard records: the manifest's list overridden by the sidecars found in store."""
    records = {int(r["index"]): r for r in (manifest or {}).get("shards", [])}
    for side in sorted(store.glob("shard-*.json")):
        rec = _read_json(side)
        if rec.get("meta_sha256") != meta_sha:
            raise ValueError(
                f"{side} belongs to a different pair store (meta sha256 {rec.get('meta_sha256')} != "
                f"{meta_sha}); refusing to mix pairs from different settings"
            )
        index = int(rec["index"])
        if not 0 <= index < n_shards or side.name != sidecar_name(index):
            raise ValueError(f"{side} records shard index {index}, which does not belong in this store")
        records[index] = {k: rec[k] for k in ("index", "seed", "n", "sha256")}
    return records


def _write_manifest(store: Path, header: dict, records: dict[int, dict]) -> None:
    shards = [records[k] for k in sorted(records)]
    save_json(store / MANIFEST, {**header, "n_shards": _n_shards(header), "shards": shards})


def _shard_problem(path: Path, record: dict) -> str | None:
    if not path.is_file():
        return f"shard {path} is missing although its record exists"
    sha = file_sha256(path)
    if sha != record["sha256"]:
        return f"shard {path} is corrupted: sha256 {sha} != recorded {record['sha256']}"
    return None


@dataclass
class PairsReport:
    """What one make_pairs call did: shard indices generated and skipped (already valid), store complete."""

    generated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    complete: bool = False


def make_pairs(
    store_dir: str | Path,
    generate: Callable[[Tensor, Tensor | None], Tensor],
    *,
    n_pairs: int,
    shard_size: int,
    data_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    meta: dict,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    dtype: str = "float32",
    progress: bool = True,
    device: str | torch.device = "cpu",
    verify: bool = True,
    repair: bool = False,
) -> PairsReport:
    """Generate this rank's shards (index k with k % world == rank) of a pair store, resuming if present.

    Shard k draws z (n, *data_shape) float32 on CPU from torch.Generator(shard_seed(seed, k)), then labels
    y (n,) uniform over num_classes from the same generator when num_classes > 0. z is rounded to the store
    dtype before generate(z, y) -> x1 (same shape as z) runs on `device` in batches of batch_size, so each
    stored pair is exactly (stored z, teacher(stored z)). meta (teacher, solver, steps, nfe, grid, ...) is
    recorded; an existing store with a different header raises ValueError naming the field. Shards with a
    record are checked (verify) and a corrupt one raises unless repair=True, which regenerates it.
    """
    if n_pairs <= 0 or shard_size <= 0 or batch_size <= 0:
        raise ValueError(
            f"make_pairs needs positive n_pairs, shard_size, batch_size; got {n_pairs}, {shard_size}, {batch_size}"
        )
    if not 0 <= rank < world:
        raise ValueError(f"make_pairs rank={rank} is outside world={world}")
    if dtype not in DTYPES:
        raise ValueError(f"pair store dtype={dtype!r}; valid: {sorted(DTYPES)}")
    if seed < 0:
        raise ValueError(f"pair store seed={seed}; must be >= 0")
    clash = sorted(set(meta) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"make_pairs meta uses reserved key(s) {clash}; they are set by make_pairs itself")
    try:
        header = json.loads(
            json.dumps(
                {
                    "format_version": FORMAT_VERSION,
                    **meta,
                    "data_shape": list(data_shape),
                    "num_classes": int(num_classes),
                    "dtype": dtype,
                    "n_pairs": int(n_pairs),
                    "shard_size": int(shard_size),
                    "seed": int(seed),
                }
            )
        )
    except TypeError as e:
        raise ValueError(f"make_pairs meta must be JSON-serialisable: {e}") from e

    store = Path(store_dir)
    store.mkdir(parents=True, exist_ok=True)
    manifest_path = store / MANIFEST
    manifest = None
    if manifest_path.exists():
        manifest = _read_json(manifest_path)
        stored = _header_of(manifest)
        diff = _first_diff(_identity(stored), _identity(header))
        header = stored
        if diff:
            name, old, new = diff
            raise ValueError(
                f"pair store {store} was made with {name}={old!r}, but {new!r} was requested; refusing to "
                f"mix pairs from different settings (use another store directory or delete this one)"
            )
    meta_sha = hashlib.sha256(_canonical(header).encode()).hexdigest()
    n_shards = _n_shards(header)
    records = _collect_records(store, manifest, meta_sha, n_shards)
    if rank == 0:
        for tmp in temp_files(manifest_path):
            tmp.unlink(missing_ok=True)
    if manifest is None:
        save_json(manifest_path, {**header, "n_shards": n_shards, "shards": []})

    mine = [k for k in range(n_shards) if k % world == rank]
    report = PairsReport()
    for k in mine:
        for tmp in temp_files(store / shard_name(k)) + temp_files(store / sidecar_name(k)):
            tmp.unlink(missing_ok=True)
        if k not in records:
            report.generated.append(k)
            continue
        problem = _shard_problem(store / shard_name(k), records[k]) if verify else None
        if problem is None:
            report.skipped.append(k)
        elif repair:
            del records[k]
            report.generated.append(k)
        else:
            raise ValueError(f"{problem}; rerun with pairs.repair=true (make_pairs(repair=True)) to regenerate it")

    bar = progress_bar(
        sum(_shard_len(header, k) for k in report.generated),
        enabled=progress and rank == 0,
        unit="pair",
        desc="pairs" if store.name == "pairs" else f"pairs[{store.name}]",
    )
    with bar:
        for k in report.generated:
            records[k] = _make_shard(store, k, generate, header, meta_sha, batch_size, device, bar)
            if world == 1:
                _write_manifest(store, header, records)
    records.update(_collect_records(store, None, meta_sha, n_shards))
    _write_manifest(store, header, records)
    report.complete = len(records) == n_shards
    return report


@torch.no_grad()
def _make_shard(
    store: Path,
    index: int,
    generate: Callable[[Tensor, Tensor | None], Tensor],
    header: dict,
    meta_sha: str,
    batch_size: int,
    device: str | torch.device,
    bar: Progress,
) -> dict:
    n = _shard_len(header, index)
    seed = shard_seed(header["seed"], index)
    store_dtype = DTYPES[header["dtype"]]
    path = store / shard_name(index)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *header["data_shape"]), generator=g, dtype=torch.float32).to(store_dtype)
    y = torch.randint(0, header["num_classes"], (n,), generator=g) if header["num_classes"] > 0 else None
    x1 = torch.empty_like(z)
    for i in range(0, n, batch_size):
        j = min(n, i + batch_size)
        zb = z[i:j].float().to(device)
        out = generate(zb, None if y is None else y[i:j].to(device))
        if tuple(out.shape) != tuple(zb.shape):
            raise ValueError(
                f"generate returned shape {tuple(out.shape)} for z of shape {tuple(zb.shape)} (shard {path})"
            )
        out = out.detach().to("cpu", torch.float32).to(store_dtype)
        if not torch.isfinite(out).all():
            raise ValueError(f"generate returned non-finite x1 (in {header['dtype']}) for shard {path}")
        x1[i:j] = out
        bar.update(j - i)
    tensors = {"z": z.contiguous(), "x1": x1}
    if y is not None:
        tensors["y"] = y
    with atomic_path(path) as tmp:
        info = _canonical({"index": index, "seed": seed, "meta_sha256": meta_sha})
        save_file(tensors, str(tmp), metadata={"lmm_pairs": info})
        sha = file_sha256(tmp)
    record = {"index": index, "seed": seed, "n": n, "sha256": sha}
    save_json(store / sidecar_name(index), {**record, "file": path.name, "meta_sha256": meta_sha})
    return record


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
        return _n_shards(self.header)

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
            problem = _shard_problem(self.shard_path(index), self.records[index])
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
    manifest = _read_json(manifest_path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path} has format_version {manifest.get('format_version')!r}; this code reads {FORMAT_VERSION}"
        )
    header = _header_of(manifest)
    meta_sha = hashlib.sha256(_canonical(header).encode()).hexdigest()
    records = _collect_records(store, manifest, meta_sha, _n_shards(header))
    pairs = PairStore(store, header, records)
    if not pairs.complete and not allow_incomplete:
        missing = [k for k in range(pairs.num_shards) if k not in records]
        raise ValueError(
            f"pair store {store} is incomplete: {len(missing)} of {pairs.num_shards} shards missing "
            f"(first {store / shard_name(missing[0])}); rerun make_pairs with the same settings to finish it"
        )
    if verify:
        pairs.verify()
    return pairs


class PairSource:
    """Deterministic batches {"z", "x1" float32, "y" int64 if labelled} streamed from a pair store.

    Epoch e permutes the shards with a generator seeded by (seed, e), groups them into windows of `window`
    shards and permutes the samples inside each window (seeded by (seed, e, w)); epochs follow each other
    seamlessly. The global batch at step s is stream[s*B*world : (s+1)*B*world], rank r gets rows
    [r*B:(r+1)*B]. Only the current window is held in memory (one buffer of window * shard_size pairs).
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
        self._layout_epoch: int | None = None
        self._order = np.empty(0, dtype=np.int64)
        self._starts = np.empty(0, dtype=np.int64)
        self._win_key: tuple[int, int] | None = None
        self._buf: dict[str, Tensor] = {}
        self._buf_shards: list[int] = []
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

    def _layout(self, epoch: int) -> None:
        if self._layout_epoch == epoch:
            return
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0, epoch]))
        self._order = rng.permutation(self.store.num_shards)
        sizes = [self.store.records[int(k)]["n"] for k in self._order]
        per_window = [sum(sizes[i : i + self.window]) for i in range(0, len(sizes), self.window)]
        self._starts = np.concatenate([[0], np.cumsum(per_window)]).astype(np.int64)
        self._layout_epoch = epoch

    def _load_window(self, epoch: int, w: int) -> None:
        """Copy window w's shards (in index order) into a reused buffer of window * shard_size rows, unless the
        buffer already holds them (a store of at most `window` shards is read once), and draw its permutation."""
        if self._win_key == (epoch, w):
            return
        self._win_key = None
        shards = sorted(int(k) for k in self._order[w * self.window : (w + 1) * self.window])
        size = int(self._starts[w + 1] - self._starts[w])
        if shards != self._buf_shards:
            self._fill_buffer(shards)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1, epoch, w]))
        self._win_perm = torch.from_numpy(rng.permutation(size))
        self._win_data = {key: t[:size] for key, t in self._buf.items()}
        self._win_key = (epoch, w)

    def _fill_buffer(self, shards: list[int]) -> None:
        self._buf_shards = []
        offset = 0
        for k in shards:
            part = self.store.load_shard(k)
            if not self._buf:
                capacity = self.window * self.store.header["shard_size"]
                self._buf = {key: torch.empty((capacity, *t.shape[1:]), dtype=t.dtype) for key, t in part.items()}
            for key, t in part.items():
                self._buf[key][offset : offset + t.shape[0]] = t
            offset += part["z"].shape[0]
            del part
        self._buf_shards = shards

    def batch(self, step: int, rank: int, world: int, batch_size: int) -> dict[str, Tensor]:
        """Rank's slice of the global batch at step: z, x1 (batch_size, *data_shape) float32, y (batch_size,)."""
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
        out = {key: v[0] if len(v) == 1 else torch.cat(v) for key, v in parts.items()}
        out["z"], out["x1"] = out["z"].float(), out["x1"].float()
        return out

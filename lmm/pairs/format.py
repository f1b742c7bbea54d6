"""The pair store's on-disk format: manifest header, shard and sidecar names, seeds, digests and checks.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmm.io import file_sha256, save_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}
_LAYOUT_KEYS = ("data_shape", "num_classes", "dtype", "n_pairs", "shard_size", "seed")
_DERIVED_KEYS = ("n_shards", "shards")
RESERVED_KEYS = ("format_version", *_LAYOUT_KEYS, *_DERIVED_KEYS)


def shard_name(index: int) -> str:
    """File name of shard `index`'s tensors."""
    return f"shard-{index:05d}.safetensors"


def sidecar_name(index: int) -> str:
    """File name of shard `index`'s sidecar record."""
    return f"shard-{index:05d}.json"


def shard_seed(base_seed: int, index: int) -> int:
    """63-bit seed of shard `index`, derived from (base_seed, index) with numpy's SeedSequence."""
    state = np.random.SeedSequence([base_seed, index]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the text that digests and shard metadata are taken of."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def meta_sha256(header: dict) -> str:
    """sha256 of the header's canonical JSON: the digest every sidecar of the store records."""
    return hashlib.sha256(canonical_json(header).encode()).hexdigest()


def read_json(path: Path) -> dict:
    """A JSON file's content; ValueError naming the file when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def first_diff(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, old value, new value) of the first difference between two JSON values; None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                return sub, old.get(key, "<missing>"), new.get(key, "<missing>")
            d = first_diff(old[key], new[key], sub)
            if d:
                return d
        return None
    return None if old == new else (path, old, new)


def header_identity(header: dict) -> dict:
    """The header without where things were (meta["teacher"]["path"]): a store copied or moved with its run
    folder still belongs to the same teacher, which meta["teacher"]["sha256"] identifies."""
    out = json.loads(json.dumps(header))
    if isinstance(out.get("teacher"), dict):
        out["teacher"].pop("path", None)
    return out


def header_of(manifest: dict) -> dict:
    """The manifest without the fields derived from shard records (n_shards, shards)."""
    return {k: v for k, v in manifest.items() if k not in _DERIVED_KEYS}


def shard_count(header: dict) -> int:
    """Number of shards of the store: ceil(n_pairs / shard_size)."""
    return math.ceil(header["n_pairs"] / header["shard_size"])


def shard_len(header: dict, index: int) -> int:
    """Pairs in shard `index`: shard_size, or the rest in the last shard."""
    return min(header["shard_size"], header["n_pairs"] - index * header["shard_size"])


def collect_records(store: Path, manifest: dict | None, meta_sha: str, n_shards: int) -> dict[int, dict]:
    """Completed shard records: the manifest's list overridden by the sidecars found in store."""
    records = {int(r["index"]): r for r in (manifest or {}).get("shards", [])}
    for side in sorted(store.glob("shard-*.json")):
        rec = read_json(side)
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


def write_manifest(store: Path, header: dict, records: dict[int, dict]) -> None:
    """Write manifest.json: the header, n_shards and the shard records in index order."""
    shards = [records[k] for k in sorted(records)]
    save_json(store / MANIFEST, {**header, "n_shards": shard_count(header), "shards": shards})


def shard_problem(path: Path, record: dict) -> str | None:
    """What is wrong with a recorded shard file (missing, sha256 differs from its record); None when intact."""
    if not path.is_file():
        return f"shard {path} is missing although its record exists"
    sha = file_sha256(path)
    if sha != record["sha256"]:
        return f"shard {path} is corrupted: sha256 {sha} != recorded {record['sha256']}"
    return None

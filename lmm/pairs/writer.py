"""make_pairs: the resumable, rank-sharded writer of a pair store."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from lmm.io import atomic_path, file_sha256, save_json, temp_files
from lmm.pairs.format import (
    DTYPES,
    FORMAT_VERSION,
    MANIFEST,
    RESERVED_KEYS,
    canonical_json,
    collect_records,
    first_diff,
    header_identity,
    header_of,
    meta_sha256,
    read_json,
    shard_count,
    shard_len,
    shard_name,
    shard_problem,
    shard_seed,
    sidecar_name,
    write_manifest,
)
from lmm.progress import Progress, progress_bar


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
    check_only: bool = False,
) -> PairsReport:
    """Generate this rank's shards (index k with k % world == rank) of a pair store, resuming if present.

    Shard k draws z (n, *data_shape) float32 on CPU from torch.Generator(shard_seed(seed, k)), then labels
    y (n,) uniform over num_classes from the same generator when num_classes > 0. z is rounded to the store
    dtype before generate(z, y) -> x1 (same shape as z) runs on `device` in batches of batch_size, so each
    stored pair is exactly (stored z, teacher(stored z)). meta (teacher, solver, steps, nfe, grid, ...) is
    recorded; an existing store with a different header raises ValueError naming the field. Shards with a
    record are checked (verify) and a corrupt one raises unless repair=True, which regenerates it. check_only:
    the argument and header checks alone; nothing is written or generated.
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
    manifest_path = store / MANIFEST
    manifest = None
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        stored = header_of(manifest)
        diff = first_diff(header_identity(stored), header_identity(header))
        header = stored
        if diff:
            name, old, new = diff
            raise ValueError(
                f"pair store {store} was made with {name}={old!r}, but {new!r} was requested; refusing to "
                f"mix pairs from different settings (use another store directory or delete this one)"
            )
    if check_only:
        return PairsReport()
    store.mkdir(parents=True, exist_ok=True)
    meta_sha = meta_sha256(header)
    n_shards = shard_count(header)
    records = collect_records(store, manifest, meta_sha, n_shards)
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
        problem = shard_problem(store / shard_name(k), records[k]) if verify else None
        if problem is None:
            report.skipped.append(k)
        elif repair:
            del records[k]
            report.generated.append(k)
        else:
            raise ValueError(f"{problem}; rerun with pairs.repair=true (make_pairs(repair=True)) to regenerate it")

    bar = progress_bar(
        sum(shard_len(header, k) for k in report.generated),
        enabled=progress and rank == 0,
        unit="pair",
        desc="pairs" if store.name == "pairs" else f"pairs[{store.name}]",
    )
    with bar:
        for k in report.generated:
            records[k] = _make_shard(store, k, generate, header, meta_sha, batch_size, device, bar)
            if world == 1:
                write_manifest(store, header, records)
    records.update(collect_records(store, None, meta_sha, n_shards))
    write_manifest(store, header, records)
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
    n = shard_len(header, index)
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
        info = canonical_json({"index": index, "seed": seed, "meta_sha256": meta_sha})
        save_file(tensors, str(tmp), metadata={"lmm_pairs": info})
        sha = file_sha256(tmp)
    record = {"index": index, "seed": seed, "n": n, "sha256": sha}
    save_json(store / sidecar_name(index), {**record, "file": path.name, "meta_sha256": meta_sha})
    return record

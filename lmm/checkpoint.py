"""Checkpoints and model files in plain formats: safetensors weights, JSON meta, torch.save'd state.

A training checkpoint is a folder `run_dir/checkpoints/step-XXXXXXXX/` holding one `<name>.safetensors`
per tensor dict (e.g. model, ema), `state.pt` (optimizer state etc., loadable with weights_only=True)
and `meta.json` (step, sha256 of every file, user meta). It is written into a temporary folder and
renamed into place, so a folder named `step-*` is always complete.

A model file is `X.safetensors` (weights, with the meta also embedded in its header) + `X.json` (meta). The
meta records `weights_sha256`, a digest of the tensors (names, dtypes, shapes, bytes); loading checks it, and
checks that `X.json` equals the meta embedded in `X.safetensors`, so a damaged file or a JSON file swapped
between two models is refused instead of used.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file

from lmm.io import atomic_write_bytes, file_sha256

CHECKPOINT_FORMAT = "lmm-checkpoint/2"
_OLD_CHECKPOINT_FORMATS = ("lmm-checkpoint/1",)
DIGEST_KEY = "weights_sha256"
_STEP_DIR = re.compile(r"step-(\d{8,})")
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_META_KEY = "lmm_meta"


class CorruptFileError(ValueError):
    """A checkpoint or model file exists but cannot be read back intact."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_bytes(obj: Any, what: str) -> bytes:
    try:
        return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from None


def _plain_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies that own their storage (safetensors refuses shared or strided tensors)."""
    out = {}
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry '{key}' is a {type(t).__name__}, not a tensor")
        out[key] = t.detach().to("cpu", copy=True).contiguous()
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _record_digest(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def tensors_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    return path.read_bytes()


def _load_safetensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"corrupt or unreadable safetensors file {path}: {e}") from None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(_read(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"corrupt JSON file {path}: {e}") from None


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: str | Path) -> int:
    """The step encoded in a checkpoint folder's name."""
    m = _STEP_DIR.fullmatch(Path(path).name)
    if m is None:
        raise ValueError(f"{path}: not a checkpoint folder (expected a name like step-00001000)")
    return int(m.group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders under run_dir/checkpoints, oldest first (temporary folders ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                    state: dict[str, Any], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write run_dir/checkpoints/step-{step:08d}/ atomically; keep only the newest `keep` checkpoints.

    Each file is written straight into a temporary folder (one tensor group's CPU copy in memory at a time) and
    hashed from disk; the folder is renamed into place once complete.

    tensors: {"model": state_dict, "ema": state_dict, ...} -> one `<name>.safetensors` each.
    state: torch.save-able with weights_only loading (tensors, numbers, strings, lists, dicts).
    meta: JSON-serialisable.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for half_deleted in root.glob("step-*"):
        if half_deleted.is_dir() and not (half_deleted / "meta.json").is_file():
            shutil.rmtree(half_deleted, ignore_errors=True)
    for name in tensors:
        if not _NAME.fullmatch(name) or name == "state":
            raise ValueError(f"checkpoint tensor group name '{name}' must match [A-Za-z0-9_-]+ and not be 'state'")
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        for name, sd in tensors.items():
            st_save_file(_plain_tensors(sd), str(tmp / f"{name}.safetensors"))
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
        files = [f"{name}.safetensors" for name in tensors] + ["state.pt"]
        for fname in files:
            _fsync_file(tmp / fname)
        record = {"format": CHECKPOINT_FORMAT, "step": step,
                  "sha256": {fname: file_sha256(tmp / fname) for fname in files}, "meta": meta}
        record["record_sha256"] = _record_digest(record)
        _write_bytes(tmp / "meta.json", _json_bytes(record, "checkpoint meta"))
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    for stale in list_checkpoints(run_dir)[:-keep]:
        doomed = root / f".tmp-del-{stale.name}-{os.getpid()}"
        os.rename(stale, doomed)
        shutil.rmtree(doomed)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """(tensors, state, meta) of a checkpoint folder; every file is checked against its recorded sha256."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    record = _load_json(path / "meta.json")
    if not isinstance(record, dict) or record.get("format") not in (CHECKPOINT_FORMAT, *_OLD_CHECKPOINT_FORMATS):
        raise CorruptFileError(f"{path / 'meta.json'}: not an lmm checkpoint record (format {CHECKPOINT_FORMAT})")
    if record["format"] == CHECKPOINT_FORMAT and record.get("record_sha256") != _record_digest(record):
        raise CorruptFileError(f"corrupt checkpoint record {path / 'meta.json'}: its content does not match its "
                               "record_sha256")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    state: dict[str, Any] | None = None
    for fname, digest in record["sha256"].items():
        fpath = path / fname
        data = _read(fpath)
        if _sha256(data) != digest:
            raise CorruptFileError(f"corrupt checkpoint file {fpath}: sha256 does not match {path / 'meta.json'}")
        if fname.endswith(".safetensors"):
            tensors[fname.removesuffix(".safetensors")] = _load_safetensors(fpath, data)
        else:
            try:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as e:
                raise CorruptFileError(f"cannot load {fpath} with weights_only=True: {e}") from None
    if state is None:
        raise CorruptFileError(f"{path / 'meta.json'}: lists no state.pt")
    return tensors, state, record["meta"]


def _model_paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_model(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write `X.safetensors` (weights; meta embedded in the header) and `X.json` (meta), each atomically.

    path: `X`, `X.safetensors` or `X.json`. The stored meta is `meta` plus `weights_sha256` (see
    `tensors_sha256`). Returns the `.safetensors` path.
    """
    weights, meta_path = _model_paths(path)
    tensors = _plain_tensors(state_dict)
    meta_bytes = _json_bytes({**meta, DIGEST_KEY: tensors_sha256(tensors)}, f"meta for {weights}")
    atomic_write_bytes(weights, st_save(tensors, metadata={_META_KEY: meta_bytes.decode()}))
    atomic_write_bytes(meta_path, meta_bytes)
    return weights


def model_file_intact(path: str | Path) -> bool:
    """Whether `X.safetensors` + `X.json` exist and load with their digest and meta consistent."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_model_file(path)
        return True
    except (CorruptFileError, FileNotFoundError):
        return False


def _embedded_meta(path: Path, data: bytes) -> dict[str, Any] | None:
    try:
        header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
        embedded = header.get("__metadata__", {}).get(_META_KEY)
        return None if embedded is None else json.loads(embedded)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CorruptFileError(f"corrupt safetensors header in {path}: {e}") from None


def load_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) from `X.safetensors` + `X.json` (the meta embedded in the weights if the JSON is absent).

    Raises CorruptFileError when the tensors do not match the recorded `weights_sha256` or `X.json` differs
    from the meta embedded in `X.safetensors`. A file without a digest (written before digests existed)
    loads with a warning.
    """
    weights, meta_path = _model_paths(path)
    data = _read(weights)
    state_dict = _load_safetensors(weights, data)
    embedded = _embedded_meta(weights, data)
    if meta_path.is_file():
        meta = _load_json(meta_path)
        if embedded is not None and embedded != meta:
            raise CorruptFileError(
                f"{meta_path} does not belong to {weights}: it differs from the meta embedded in the weights (a "
                "damaged file, JSON files swapped between models, or a write cut short). Rerun the command that "
                f"trained it to rewrite both from its checkpoint, or delete {meta_path.name} to use the embedded meta")
    elif embedded is None:
        raise FileNotFoundError(f"missing file: {meta_path} (and {weights} has no embedded meta)")
    else:
        meta = embedded
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{meta_path}: the model meta must be a JSON object")
    recorded = meta.get(DIGEST_KEY)
    if recorded is None:
        warnings.warn(f"{weights} records no {DIGEST_KEY} (written by an older lmm): its integrity is not checked",
                      stacklevel=2)
    elif tensors_sha256(state_dict) != recorded:
        raise CorruptFileError(
            f"{weights} is damaged: its tensors do not match the {DIGEST_KEY} recorded with it. To recover, rerun "
            "the command that trained it with the same config (it rewrites a damaged model from the run's final "
            "checkpoint, or resumes training from the last one), or restore it from a copy")
    return state_dict, meta

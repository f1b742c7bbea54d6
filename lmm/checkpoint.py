"""Checkpoints and model files in plain formats: safetensors weights, JSON meta, torch.save'd state.

A training checkpoint is a folder `run_dir/checkpoints/step-XXXXXXXX/` holding one `<name>.safetensors`
per tensor dict (e.g. model, ema), `state.pt` (optimizer state etc., loadable with weights_only=True)
and `meta.json` (step, sha256 of every file, user meta). It is written into a temporary folder and
renamed into place, so a folder named `step-*` is always complete.

A model file is `X.safetensors` (weights, with the meta also embedded in its header) + `X.json` (meta).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lmm.io import atomic_write_bytes

CHECKPOINT_FORMAT = "lmm-checkpoint/1"
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
    files: dict[str, bytes] = {}
    for name, sd in tensors.items():
        if not _NAME.fullmatch(name) or name == "state":
            raise ValueError(f"checkpoint tensor group name '{name}' must match [A-Za-z0-9_-]+ and not be 'state'")
        files[f"{name}.safetensors"] = st_save(_plain_tensors(sd))
    buf = io.BytesIO()
    torch.save(state, buf)
    files["state.pt"] = buf.getvalue()
    record = {"format": CHECKPOINT_FORMAT, "step": step,
              "sha256": {fname: _sha256(data) for fname, data in files.items()}, "meta": meta}
    files["meta.json"] = _json_bytes(record, "checkpoint meta")

    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    for fname, data in files.items():
        _write_bytes(tmp / fname, data)
    _fsync_dir(tmp)
    if final.exists():
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    for stale in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """(tensors, state, meta) of a checkpoint folder; every file is checked against its recorded sha256."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    record = _load_json(path / "meta.json")
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise CorruptFileError(f"{path / 'meta.json'}: not an lmm checkpoint record (format {CHECKPOINT_FORMAT})")
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

    path: `X`, `X.safetensors` or `X.json`. Returns the `.safetensors` path.
    """
    weights, meta_path = _model_paths(path)
    meta_bytes = _json_bytes(meta, f"meta for {weights}")
    atomic_write_bytes(weights, st_save(_plain_tensors(state_dict), metadata={_META_KEY: meta_bytes.decode()}))
    atomic_write_bytes(meta_path, meta_bytes)
    return weights


def load_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) from `X.safetensors` + `X.json` (the meta embedded in the weights if the JSON is absent)."""
    weights, meta_path = _model_paths(path)
    data = _read(weights)
    state_dict = _load_safetensors(weights, data)
    if meta_path.is_file():
        meta = _load_json(meta_path)
    else:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8: 8 + header_len])
        embedded = header.get("__metadata__", {}).get(_META_KEY)
        if embedded is None:
            raise FileNotFoundError(f"missing file: {meta_path} (and {weights} has no embedded meta)")
        meta = json.loads(embedded)
    return state_dict, meta

"""Atomic file writes (temporary file beside the target, fsync, rename) and file and folder hashes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path `.NAME.XXXX.tmp` beside `path`; after the block writes it, fsync and rename it
    over `path`. On an error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temp_files(path: str | Path) -> list[Path]:
    """Leftover temporary files of `atomic_path(path)` (from a killed writer)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_json(path: str | Path, obj: Any) -> None:
    """JSON with sorted keys, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def path_sha256(path: str | Path) -> str:
    """`file_sha256` of a file; of a folder, the sha256 of one line per file below it (symlinks followed), in order of
    relative POSIX path: the path, a NUL byte, the file's sha256 hex digest, a newline."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for rel, p in files:
        h.update(f"{rel}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()

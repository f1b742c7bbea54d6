"""Batches of a BatchSource on the training device, read one step ahead in a background thread."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from lmm.data.arrays import to_model_units


class Prefetcher:
    """source's batches {key: (batch_size, ...)} of rank `rank` of `world` on `device`, in model units.

    `batch(step, next_step)` returns step's batch and has a background thread read next_step's meanwhile: in the
    source's stored dtypes where it has `raw_batch` (uint8 images, float16 pairs; else `batch`), on a GPU into
    pinned memory and copied on a side stream (non_blocking), so that the step that trains overlaps the next one's
    reading and upload; the conversion to model units (lmm.data.arrays.to_model_units) runs on the device. A batch
    depends on its step alone, as the source's do.
    """

    def __init__(self, source: Any, rank: int, world: int, batch_size: int, device: torch.device):
        self.source, self.rank, self.world, self.batch_size = source, rank, world, batch_size
        self.device = device
        self._read_rows = getattr(source, "raw_batch", source.batch)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lmm-prefetch")
        self._ahead: tuple[int, Future] | None = None

    def _read(self, step: int) -> tuple[dict[str, Tensor], torch.cuda.Event | None]:
        rows = self._read_rows(step, self.rank, self.world, self.batch_size)
        if self._stream is None:
            return to_model_units({k: v.to(self.device) for k, v in rows.items()}), None
        with torch.cuda.stream(self._stream):
            out = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in rows.items()}
            done = torch.cuda.Event()
            done.record(self._stream)
        return out, done

    def batch(self, step: int, next_step: int | None = None) -> dict[str, Tensor]:
        """Step's batch on the device; next_step (None: none) is read in the background meanwhile."""
        ahead = self._ahead
        pending = ahead[1] if ahead is not None and ahead[0] == step else self._pool.submit(self._read, step)
        self._ahead = None if next_step is None else (next_step, self._pool.submit(self._read, next_step))
        rows, done = pending.result()
        if done is None:
            return rows
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        for v in rows.values():
            v.record_stream(current)
        return to_model_units(rows)

    def close(self) -> None:
        """Stop the background thread (after the read in progress, if any)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

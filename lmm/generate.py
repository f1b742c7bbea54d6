"""Sampling a teacher or student on seeded noise, identically in one process or under torchrun, and saving
the samples (an .npz and a PNG grid, or a folder of PNG files)."""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from lmm import dist
from lmm.data.images import save_image_grid, to_uint8
from lmm.io import atomic_path, atomic_write_text
from lmm.progress import progress_bar
from lmm.sampling import default_grid, sample_lines
from lmm.teachers import Teacher
from lmm.teachers.base import sample_teacher


def bf16_autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """torch.autocast to bfloat16 on `device`'s type, switched on (or, enabled=False, off) inside the block."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _check_label(label: int | None, ncls: int) -> None:
    if label is not None and not 0 <= label < ncls:
        raise ValueError(f"class {label} is not one of the model's {ncls} classes" if ncls else
                         f"class {label} asked of an unconditional model")


def noise_batches(n: int, batch_size: int, shape: tuple[int, ...], ncls: int, seed: int, label: int | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Seeded noise z (b, *shape) float32 in batches of b = batch_size (the last one smaller), identical for
    every model sampled with `seed`, and for conditional models labels y (b,) int64: balanced (sample i has
    class i % ncls), or all `label`; y is None for unconditional ones."""
    _check_label(label, ncls)
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        z = torch.randn((b, *shape), generator=gen)
        y = None if not ncls else torch.full((b,), label) if label is not None else torch.arange(start, start + b) % ncls
        yield z, y


def seed_batches(seeds: Sequence[int], batch_size: int, shape: tuple[int, ...], ncls: int, label: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per-image noise in batches of batch_size: the image of seed s gets z = torch.randn(shape) from
    torch.Generator().manual_seed(s) alone (the first noise of `noise_batches` with seed s), and for conditional
    models label `label`, else s % ncls; so an image depends on its seed only, not on its batch."""
    _check_label(label, ncls)
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start:start + batch_size])
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in chunk])
        y = None if not ncls else torch.full((len(chunk),), label) if label is not None else torch.tensor(chunk) % ncls
        yield z, y


def restart_generator(seed: int, batch: int) -> torch.Generator:
    """The CPU generator of the restart sampler's fresh noise for noise batch `batch` of sampling seed `seed`:
    independent of the device, of the torchrun rank that samples the batch and of the initial noise's stream."""
    digest = hashlib.sha256(f"lmm-restart:{seed}:{batch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def sample(model: torch.nn.Module | Teacher, n: int | None = None, *, seed: int = 0, seeds: Sequence[int] | None = None,
           batch_size: int = 500, nfe: int | None = None, grid: list[float] | None = None, mode: str | None = None,
           solver: str = "euler", steps: int | None = None, schedule: str = "edm", bf16: bool = False,
           device: str | torch.device = "cpu", progress: bool = False, label: int | None = None,
           compile: bool = False) -> dict[str, Any]:
    """Draw n samples from the noise stream of `seed` (`noise_batches`), or one per seed of `seeds`
    (`seed_batches`: each image depends on its seed alone; restart students then sample one seed s at a time, their
    fresh noise from `restart_generator(s, 0)`, so that unconditional `seeds=[s]` equals `n=1, seed=s`).
    Teachers: `solver` with `steps` intervals on its `schedule`; students: the line sampler on `grid` (default grid
    for `nfe`) in `mode` (default: the model's own `sampler`, lmm.models.build_model; restart draws noise batch i's
    fresh noise from `restart_generator(seed, i)`); conditional models get balanced labels (i % classes, or
    s % classes for seed s), or all `label`. Returns {"images": uint8 (N,H,W,C) (float (N, D) for vector data),
    "labels": (N,) or None, "seeds": (N,) int64 or None (without `seeds`), "nfe": int}. compile: a student's
    network runs compiled at batch_size rows (`sample_lines`; teachers are not compiled here). Under torchrun each rank
    samples a contiguous share of the noise batches and every rank returns all N samples, identical to a single
    process's."""
    if (n is None) == (seeds is None):
        raise ValueError("sample: give one of n and seeds")
    device = torch.device(device)
    is_teacher = isinstance(model, Teacher)
    inner = model.model if is_teacher else model
    shape, ncls = tuple(inner.data_shape), inner.num_classes
    if not is_teacher:
        grid = list(grid if grid is not None else default_grid(nfe or 1))
        mode = mode or getattr(model, "sampler", "line")
    if seeds is None:
        total, batches = n, noise_batches(n, batch_size, shape, ncls, seed, label)
    else:
        seeds = [int(s) for s in seeds]
        batch_size = 1 if mode == "restart" else batch_size
        total, batches = len(seeds), seed_batches(seeds, batch_size, shape, ncls, label)
    mine, world = dist.shard(-(-total // batch_size)), dist.world_size()
    images, labels, used = [torch.empty(0, *shape)], [torch.empty(0, dtype=torch.long)], 0
    bar = progress_bar(total, desc="sample", unit="img", enabled=progress, leave=False)
    for i, (z, y) in enumerate(batches):
        if i not in mine:
            continue
        z, y = z.to(device), None if y is None else y.to(device)
        with bf16_autocast(device, bf16):
            if is_teacher:
                sol = sample_teacher(model, z, steps or nfe, solver, y, schedule=schedule)
            elif mode == "restart":
                key = (seed, i) if seeds is None else (seeds[i], 0)
                sol = sample_lines(model, z, grid, y, mode=mode, generator=restart_generator(*key),
                                   compile=compile, batch_size=batch_size)
            else:
                sol = sample_lines(model, z, grid, y, mode=mode, compile=compile, batch_size=batch_size)
        used = sol.nfe
        images.append(sol.x.float().cpu())
        bar.update(z.shape[0] * world)
        if y is not None:
            labels.append(y.cpu())
    bar.close()
    x = dist.all_gather_tensor(torch.cat(images))
    y = dist.all_gather_tensor(torch.cat(labels)) if ncls else None
    used = -int(dist.all_reduce_min(torch.tensor([-used])).item())
    return {"images": to_uint8(x) if x.dim() == 4 else x.numpy(), "labels": None if y is None else y.numpy(),
            "seeds": None if seeds is None else np.asarray(seeds, dtype=np.int64), "nfe": used}


def save_samples(result: dict[str, Any], path: str | Path, grid_n: int = 64) -> Path:
    """Write `images` (and `labels`, `seeds` when present) to an .npz (atomically) and a PNG grid beside it: the
    first `grid_n` images, or for several classes one row per class (up to 16 classes, 8 samples each)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {key: result[key] for key in ("images", "labels", "seeds") if result.get(key) is not None}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    if result["images"].ndim == 4:
        labels = result.get("labels")
        if labels is not None and len(np.unique(labels)) > 1:
            per_class = [np.flatnonzero(labels == k)[:8] for k in np.unique(labels)[:16]]
            width = min(len(i) for i in per_class)
            save_image_grid(result["images"][np.concatenate([i[:width] for i in per_class])],
                            path.with_suffix(".png"), nrow=width)
        else:
            save_image_grid(result["images"][:grid_n], path.with_suffix(".png"))
    return path


def save_png_folder(result: dict[str, Any], folder: str | Path) -> Path:
    """Write each image of `result` to its own PNG in `folder` (created if absent), atomically, named by its seed
    (else its index) in 6 digits, 000042.png, as NVlabs/edm's generate.py names them, so that EDM's fid.py and other
    image-folder tools read the folder; conditional samples' labels go to folder/dataset.json in EDM dataset_tool's
    layout, {"labels": [["000042.png", 3], ...]}."""
    from PIL import Image

    images = result["images"]
    if images.ndim != 4:
        raise ValueError(f"{folder}: PNG files hold images, and these samples are vectors of shape {images.shape[1:]}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seeds = result.get("seeds")
    names = [f"{int(s):06d}.png" for s in (range(len(images)) if seeds is None else seeds)]
    for name, image in zip(names, images):
        with atomic_path(folder / name) as tmp:
            Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(tmp, format="PNG")
    if result.get("labels") is not None:
        atomic_write_text(folder / "dataset.json",
                          json.dumps({"labels": [[name, int(y)] for name, y in zip(names, result["labels"])]}) + "\n")
    return folder

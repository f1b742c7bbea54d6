"""Conversion of [-1, 1] image tensors to uint8, an atomic PNG grid writer and labelled rows of images."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lmm.io import atomic_path


def to_uint8(x: Tensor) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8 via round((x + 1) * 127.5), clipped."""
    if x.ndim != 4:
        raise ValueError(f"to_uint8 expects (N, C, H, W), got shape {tuple(x.shape)}")
    u = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return u.permute(0, 2, 3, 1).contiguous().numpy()


def _as_uint8_nhwc(images: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(images, Tensor):
        if images.is_floating_point():
            return to_uint8(images)
        images = images.cpu().numpy()
    images = np.asarray(images)
    if np.issubdtype(images.dtype, np.floating):
        return to_uint8(torch.from_numpy(images))
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1]; "
            f"got {images.dtype} {images.shape}"
        )
    return images


def save_image_grid(
    images: np.ndarray | Tensor, path: str | Path, nrow: int = 8, pad: int = 2
) -> Path:
    """Write images as one PNG grid with nrow images per row, atomically.

    images: uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1]; C is 1 or 3.
    """
    from PIL import Image

    arr = _as_uint8_nhwc(images)
    n, h, w, c = arr.shape
    if n == 0:
        raise ValueError(f"save_image_grid got no images for {path}")
    if c not in (1, 3):
        raise ValueError(f"save_image_grid needs 1 or 3 channels, got {c} for {path}")
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = np.zeros((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top : top + h, left : left + w] = arr[i]
    img = Image.fromarray(grid[:, :, 0] if c == 1 else grid)
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def save_labelled_rows(rows: list[tuple[str, np.ndarray]], path: str | Path, scale: int = 2, pad: int = 2) -> Path:
    """Write one PNG with a row of images per (label, images uint8 (N, H, W, C)), all rows the same N, H, W, C: the
    label on the left, the images upscaled `scale` times (nearest neighbour) on a white background, atomically.
    Row r's image i has its top-left corner at (pad + r * (H * scale + pad), width - (N - i) * (W * scale + pad))."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError(f"save_labelled_rows got no rows for {path}")
    arrays = [_as_uint8_nhwc(images) for _, images in rows]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"save_labelled_rows: rows differ in shape {[a.shape for a in arrays]} for {path}")
    n, h, w, c = arrays[0].shape
    if c not in (1, 3):
        raise ValueError(f"save_labelled_rows needs 1 or 3 channels, got {c} for {path}")
    ch, cw = h * scale, w * scale
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textbbox((0, 0), label)[2]) for label, _ in rows) + 2 * pad
    canvas = Image.new("RGB", (label_w + pad + n * (cw + pad), pad + len(rows) * (ch + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, ((label, _), arr) in enumerate(zip(rows, arrays)):
        top = pad + r * (ch + pad)
        box = draw.textbbox((0, 0), label)
        draw.text((pad, top + (ch - (box[3] - box[1])) // 2 - box[1]), label, fill="black")
        for i, image in enumerate(arr.repeat(scale, axis=1).repeat(scale, axis=2)):
            rgb = np.repeat(image, 3, axis=2) if c == 1 else image
            canvas.paste(Image.fromarray(rgb), (label_w + pad + i * (cw + pad), top))
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path

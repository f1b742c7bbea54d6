"""Conversion of [-1, 1] image tensors to uint8 and an atomic PNG grid writer."""
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

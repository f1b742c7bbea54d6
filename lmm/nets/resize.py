"""Image resizing on the training paths of lmm's nets and losses, with a backward pass that is deterministic on every
device when deterministic algorithms are on (run.deterministic, lmm.dist.set_kernels).

F.interpolate's bilinear backward accumulates with atomicAdd on CUDA and has no deterministic kernel, so a run with
run.deterministic would not repeat bitwise. `resize` and `upsample_nearest` use F.interpolate by default (the
fastest kernels, and the exact numbers lmm's measured runs were made with), and with deterministic algorithms on,
`bilinear_resize` / `upsample2x`: only matmuls, expand/reshape and slicing, equal to F.interpolate up to float
rounding (nearest: exactly in the forward pass).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor


@lru_cache(maxsize=64)
def bilinear_matrix(n: int, r: int, antialias: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(r, n) weights of F.interpolate's 1-D bilinear resize (align_corners=False) from n to r samples: torch's own
    kernel applied to the identity basis, on the CPU in float64. Cached; never modify the result."""
    with torch.inference_mode(False), torch.no_grad():
        basis = torch.eye(n, dtype=torch.float64)[None, None]
        rows = F.interpolate(basis, size=(r, n), mode="bilinear", align_corners=False, antialias=antialias)
        return rows[0, 0].to(device=device, dtype=dtype)


def resize(x: Tensor, size: tuple[int, int], antialias: bool = False) -> Tensor:
    """x (B, C, H, W) -> (B, C, h, w), bilinear (align_corners=False): F.interpolate, or `bilinear_resize` when
    deterministic algorithms are on."""
    if torch.are_deterministic_algorithms_enabled():
        return bilinear_resize(x, size, antialias)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def upsample_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest up-sampling of x (B, C, h, w) to (H, W) = size with H in {2h - 1, 2h}, W in {2w - 1, 2w}:
    F.interpolate, or `upsample2x` when deterministic algorithms are on."""
    if torch.are_deterministic_algorithms_enabled():
        return upsample2x(x, size)
    return F.interpolate(x, size=size, mode="nearest")


def bilinear_resize(x: Tensor, size: tuple[int, int], antialias: bool = False) -> Tensor:
    """x (..., H, W) -> (..., h, w) for size (h, w): F.interpolate(x, size, mode="bilinear", align_corners=False,
    antialias=antialias) up to float rounding, computed as A_h @ x @ A_w^T with A_h (h, H), A_w (w, W) from
    `bilinear_matrix`. Runs in x's dtype, also under autocast, as F.interpolate does."""
    ah = bilinear_matrix(x.shape[-2], size[0], antialias, x.dtype, x.device)
    aw = bilinear_matrix(x.shape[-1], size[1], antialias, x.dtype, x.device)
    with torch.autocast(x.device.type, enabled=False):
        return ah @ x @ aw.t()


def upsample2x(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest up-sampling of x (..., h, w) to size (H, W) with H in {2h - 1, 2h}, W in {2w - 1, 2w} (a size that
    ceil-mode pooling by 2 maps to (h, w)): each pixel becomes a 2x2 block, cropped to (H, W). Equal to
    F.interpolate(x, size, mode="nearest") for these sizes."""
    *lead, h, w = x.shape
    if not (2 * h - 1 <= size[0] <= 2 * h and 2 * w - 1 <= size[1] <= 2 * w):
        raise ValueError(f"upsample2x: size {tuple(size)} is not twice {(h, w)} (less one for odd sizes)")
    blocks = x[..., :, None, :, None].expand(*lead, h, 2, w, 2).reshape(*lead, 2 * h, 2 * w)
    return blocks[..., : size[0], : size[1]]

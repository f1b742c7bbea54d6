"""Per-sample distances between predictions and targets: a, b (B, ...) -> (B,)."""
from __future__ import annotations

import math
from typing import Callable

from torch import Tensor

Distance = Callable[[Tensor, Tensor], Tensor]
DISTANCES = ("l2", "pseudo_huber")


def l2(a: Tensor, b: Tensor) -> Tensor:
    """Mean over all non-batch dims of the squared error, (B,)."""
    return (a - b).square().flatten(1).mean(1)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """sqrt(||a - b||^2 + c^2) - c on the flattened per-sample vectors, (B,)."""
    return ((a - b).square().flatten(1).sum(1) + c * c).sqrt() - c


def pseudo_huber_c(dim: int) -> float:
    """The improved-consistency-training constant c = 0.00054 sqrt(dim)."""
    return 0.00054 * math.sqrt(dim)


def get_distance(name: str, dim: int) -> Distance:
    """Distance `name` ("l2" | "pseudo_huber") for samples with `dim` elements each."""
    if name == "l2":
        return l2
    if name == "pseudo_huber":
        c = pseudo_huber_c(dim)
        return lambda a, b: pseudo_huber(a, b, c)
    raise ValueError(f"unknown distance {name!r}; valid: {', '.join(DISTANCES)}")

"""Pseudo-Huber distance (improved consistency training, Song and Dhariwal 2023)."""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from lmm.losses.base import LossTerm


def pseudo_huber_c(dim: int) -> float:
    """The improved-consistency-training constant c = 0.00054 sqrt(dim)."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """sqrt(||a - b||^2 + c^2) - c on the flattened per-sample vectors: a, b (B, ...) -> (B,)."""
    return ((a - b).square().flatten(1).sum(1) + c * c).sqrt() - c


class PseudoHuber(LossTerm):
    """sqrt(||pred - x1||^2 + c^2) - c with c = 0.00054 sqrt(dim)."""

    name = "pseudo_huber"

    def forward(self, pred: Tensor, target: Tensor, ctx: dict[str, Any]) -> Tensor:
        return pseudo_huber(pred, target, pseudo_huber_c(pred[0].numel()))

"""Squared error: the plain lines loss."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from lmm.losses.base import LossTerm


def l2(a: Tensor, b: Tensor) -> Tensor:
    """Mean over all non-batch dims of the squared error: a, b (B, ...) -> (B,)."""
    return (a - b).square().flatten(1).mean(1)


class L2(LossTerm):
    """Mean squared error between the predicted and the teacher's endpoint."""

    name = "l2"

    def forward(self, pred: Tensor, target: Tensor, ctx: dict[str, Any]) -> Tensor:
        return l2(pred, target)

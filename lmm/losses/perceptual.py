"""Perceptual distance between the predicted and the teacher's endpoint, LPIPS-style.

network="efficientnet" (default): the frozen EfficientNet-Lite0 pyramid (lmm.nets.pyramid), each layer's
features unit-normalised over channels, squared differences summed over channels, averaged over positions,
summed over layers (LPIPS without learned layer weights). network="lpips_vgg" | "lpips_alex": real LPIPS
(Zhang et al. 2018) with its learned linear layers (lmm.nets.lpips).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmm.losses.base import LossTerm
from lmm.registry import option

NETWORKS = ("efficientnet", "lpips_vgg", "lpips_alex")


def normalize_channels(f: Tensor, eps: float = 1e-10) -> Tensor:
    """f (B, C, H, W) divided by its L2 norm over channels at each position."""
    return f / (f.square().sum(1, keepdim=True).sqrt() + eps)


def feature_distance(fa: list[Tensor], fb: list[Tensor]) -> Tensor:
    """sum over layers of mean over positions of ||normalised fa - normalised fb||^2: (B,)."""
    return sum((normalize_channels(a) - normalize_channels(b)).square().sum(1).mean((1, 2)) for a, b in zip(fa, fb))


def pyramid_distance(features: torch.nn.Module, pred: Tensor, target: Tensor, batched: bool) -> Tensor:
    """feature_distance of features(pred) and features(target), no gradient to target: (B,). batched: one call on
    the (2B, C, H, W) batch of both, half the kernel launches that a GPU's small per-step passes are bound by, for a
    backward pass over the target's rows too; on the CPU that price shows (the tiny full-method checksum run's steps
    17% slower), so the loss makes two calls there."""
    if not batched:
        with torch.no_grad():
            ft = features(target)
        return feature_distance(features(pred), ft)
    b = pred.shape[0]
    both = features(torch.cat([pred, target.detach()]))
    return feature_distance([f[:b] for f in both], [f[b:].detach() for f in both])


class Perceptual(LossTerm):
    """Options (`student.perceptual`): network (see module docstring), resolution (the side images are resized
    to for EfficientNet-Lite0, a multiple of 32; LPIPS uses 64 at least)."""

    name = "perceptual"

    @dataclass(frozen=True)
    class Options:
        network: str = option("efficientnet", choices=NETWORKS)
        resolution: int = option(64, min=32)

    def __init__(self, network: str = Options.network, resolution: int = Options.resolution) -> None:
        super().__init__()
        if network not in NETWORKS:
            raise ValueError(f"student.perceptual.network: unknown {network!r}; valid: {', '.join(NETWORKS)}")
        self.network, self.resolution = network, resolution
        self.features: torch.nn.Module | None = None

    def setup(self, data_shape: tuple[int, ...], num_classes: int, reals: Any = None, shared: dict | None = None
              ) -> None:
        if len(data_shape) != 3:
            raise ValueError(f"the perceptual loss needs image data (C, H, W), not shape {data_shape}")
        if self.network == "efficientnet":
            from lmm.nets.pyramid import shared_pyramid

            self.features = shared_pyramid(self.resolution, shared)
        else:
            from lmm.nets.lpips import LPIPS

            self.features = LPIPS(self.network.removeprefix("lpips_"), resolution=max(64, self.resolution))

    def networks(self) -> list[torch.nn.Module]:
        return [] if self.features is None else [self.features]

    def forward(self, pred: Tensor, target: Tensor, ctx: dict[str, Any]) -> Tensor:
        """pred, target (B, C, H, W) -> (B,); on a GPU, EfficientNet-Lite0 sees both in one batch (pyramid_distance)."""
        if self.features is None:
            raise RuntimeError("Perceptual.setup() must run before the loss is used")
        if self.network != "efficientnet":
            return self.features(pred, target)
        return pyramid_distance(self.features, pred, target, batched=pred.is_cuda)


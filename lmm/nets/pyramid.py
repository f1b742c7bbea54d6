"""A frozen multi-scale feature pyramid of the pretrained EfficientNet-Lite0, for perceptual and adversarial losses.

Never the Inception network that FID uses: a loss on FID's own features would game the metric.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmm.nets.resize import resize


class EfficientNetPyramid(nn.Module):
    """Images (B, C, H, W) in [-1, 1] (C = 1 or 3) -> the outputs of EfficientNet-Lite0's stages at strides 4, 8,
    16 and 32: [(B, 24, r/4, r/4), (B, 40, r/8, r/8), (B, 112, r/16, r/16), (B, 320, r/32, r/32)] for inputs
    resized (bilinear, antialiased when shrinking, see lmm.nets.resize) to `resolution` r. Frozen (eval mode, no
    parameter gradients); gradients flow to the input."""

    STRIDES = (4, 8, 16, 32)

    def __init__(self, resolution: int = 64) -> None:
        super().__init__()
        from lmm.metrics.features import load_efficientnet_lite0

        if resolution < 32 or resolution % 32:
            raise ValueError(f"EfficientNetPyramid resolution must be a multiple of 32, got {resolution}")
        net, _ = load_efficientnet_lite0(resolution)
        self.resolution = resolution
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        self.taps = self._stage_ends()
        self.channels = [self.blocks[i]._project_conv.out_channels for i in self.taps]
        self.requires_grad_(False).eval()

    def _stage_ends(self) -> list[int]:
        """Index of the last block before each of the wanted strides is passed (found by a probe)."""
        x = torch.zeros(1, 3, self.resolution, self.resolution)
        taps, size = {}, None
        with torch.no_grad():
            x = self.stem(x)
            for i, block in enumerate(self.blocks):
                x = block(x)
                size = x.shape[-1]
                stride = self.resolution // size
                if stride in self.STRIDES:
                    taps[stride] = i
        return [taps[s] for s in self.STRIDES]

    def train(self, mode: bool = True) -> EfficientNetPyramid:
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        r = self.resolution
        if x.shape[-2:] != (r, r):
            x = resize(x, (r, r), antialias=x.shape[-1] > r)
        x = ((x + 1) * 127.5 - 127.0) / 128.0
        x = self.stem(x)
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                out.append(x)
            if i == self.taps[-1]:
                break
        return out


def shared_pyramid(resolution: int, shared: dict | None = None) -> EfficientNetPyramid:
    """The EfficientNetPyramid at `resolution`, built once per `shared` dict (a new one when shared is None)."""
    if shared is None:
        return EfficientNetPyramid(resolution)
    key = ("efficientnet_pyramid", resolution)
    if key not in shared:
        shared[key] = EfficientNetPyramid(resolution)
    return shared[key]

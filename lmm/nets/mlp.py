"""MLP for flat data (toy 2-D sets): input concatenated with the noise-label embedding."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmm.nets.unet import NoiseEmbedding, linear


class MLP(nn.Module):
    """``forward(x, noise_label, class_labels=None) -> same shape as x``.

    x: (B, *data_shape), flattened to (B, D); noise_label: (B,) float; class_labels: (B,) long
    or None. Hidden: ``depth`` layers of Linear + SiLU of size ``width`` on [x, emb(noise, y)].
    The output layer is zero-initialised, so a fresh network returns exactly zero.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: int = 0,
        *,
        width: int = 256,
        depth: int = 4,
        embedding: str = "positional",
        emb_dim: int = 128,
        fourier_scale: float = 16.0,
    ) -> None:
        super().__init__()
        if width < 1 or depth < 1 or emb_dim < 2:
            raise ValueError(f"MLP needs width >= 1, depth >= 1, emb_dim >= 2; got {width}, {depth}, {emb_dim}")
        self.data_shape = tuple(int(s) for s in data_shape)
        self.num_classes = num_classes
        dim = math.prod(self.data_shape)
        self.embed = NoiseEmbedding(embedding, emb_dim, emb_dim, num_classes, fourier_scale)
        sizes = [dim + emb_dim] + [width] * depth
        self.hidden = nn.ModuleList(linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = linear(width, dim, scale=0.0)

    def forward(self, x: Tensor, noise_label: Tensor, class_labels: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        emb = self.embed(noise_label, b, class_labels).to(x.dtype)
        h = torch.cat([x.reshape(b, -1), emb], dim=1)
        for layer in self.hidden:
            h = F.silu(layer(h))
        return self.out(h).reshape(x.shape)

"""U-Net in the style of DDPM++ (Song et al. 2021, as configured in Karras et al. 2022, EDM).

Written from the architecture description, not from NVlabs code. Also holds the noise-label
embedding shared by every raw network in :mod:`lmm.nets`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmm.nets.resize import upsample_nearest

SKIP_SCALE = 1.0 / math.sqrt(2.0)
EMBEDDINGS = ("positional", "fourier")


def _init(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> None:
    """Xavier-uniform weights times ``scale`` (0 gives an exactly zero layer), zero bias."""
    nn.init.xavier_uniform_(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(scale)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def conv(cin: int, cout: int, kernel: int, scale: float = 1.0) -> nn.Conv2d:
    layer = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    _init(layer, scale)
    return layer


def linear(cin: int, cout: int, scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(cin, cout)
    _init(layer, scale)
    return layer


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups and at least 4 channels per group."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class PositionalEmbedding(nn.Module):
    """Sinusoidal features of a scalar: (B,) -> (B, dim), [cos, sin] at geometric frequencies."""

    def __init__(self, dim: int, max_positions: int = 10000) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"PositionalEmbedding: dim must be even, got {dim}")
        half = dim // 2
        freqs = (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        arg = x.float()[:, None] * self.freqs[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (fixed frequencies ~ N(0, scale^2)): (B,) -> (B, dim)."""

    def __init__(self, dim: int, scale: float = 16.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"FourierEmbedding: dim must be even, got {dim}")
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        arg = x.float()[:, None] * (2 * math.pi * self.freqs[None, :])
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class NoiseEmbedding(nn.Module):
    """Noise label (and optional class label) -> conditioning vector.

    features(noise_label) [+ class embedding] -> Linear -> SiLU -> Linear -> SiLU.
    noise_label: (B,) float or a scalar (broadcast to the batch); class_labels: (B,) long or None.
    Output: (B, out_dim). ``class_labels=None`` on a conditional net means a zero class embedding.
    """

    def __init__(
        self,
        kind: str,
        feature_dim: int,
        out_dim: int,
        num_classes: int = 0,
        fourier_scale: float = 16.0,
    ) -> None:
        super().__init__()
        if kind == "positional":
            self.features: nn.Module = PositionalEmbedding(feature_dim)
        elif kind == "fourier":
            self.features = FourierEmbedding(feature_dim, fourier_scale)
        else:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {kind!r}")
        self.num_classes = num_classes
        self.label = nn.Embedding(num_classes, feature_dim) if num_classes > 0 else None
        if self.label is not None:
            nn.init.normal_(self.label.weight, std=1.0)
        self.map0 = linear(feature_dim, out_dim)
        self.map1 = linear(out_dim, out_dim)

    def forward(self, noise_label: Tensor, batch: int, class_labels: Tensor | None = None) -> Tensor:
        if noise_label.ndim == 0:
            noise_label = noise_label.expand(batch)
        if noise_label.shape != (batch,):
            raise ValueError(f"noise_label must have shape ({batch},) or (), got {tuple(noise_label.shape)}")
        emb = self.features(noise_label).to(self.map0.weight.dtype)
        if class_labels is not None:
            if self.label is None:
                raise ValueError("class_labels given to an unconditional network (num_classes=0)")
            if class_labels.shape != (batch,):
                raise ValueError(f"class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")
            emb = emb + self.label(class_labels.long())
        emb = F.silu(self.map0(emb))
        return F.silu(self.map1(emb))


class ResBlock(nn.Module):
    """Residual block with adaptive GroupNorm scale/shift from the embedding.

    x (B, cin, H, W), emb (B, emb_dim) -> (B, cout, H', W'), where H' = ceil(H/2) when
    ``down``, the given ``size`` when ``up``, else H. Optional self-attention after the block.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        emb_dim: int,
        *,
        down: bool = False,
        up: bool = False,
        attention: bool = False,
        dropout: float = 0.0,
        channels_per_head: int = 64,
    ) -> None:
        super().__init__()
        self.down, self.up = down, up
        self.norm0 = group_norm(cin)
        self.conv0 = conv(cin, cout, 3)
        self.affine = linear(emb_dim, 2 * cout)
        self.norm1 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv(cout, cout, 3, scale=1e-5)
        self.skip = conv(cin, cout, 1) if (cin != cout or down or up) else None
        self.heads = max(1, cout // channels_per_head) if attention else 0
        if attention:
            self.norm2 = group_norm(cout)
            self.qkv = conv(cout, 3 * cout, 1)
            self.proj = conv(cout, cout, 1, scale=1e-5)

    def _resample(self, x: Tensor, size: tuple[int, int] | None) -> Tensor:
        if self.down:
            return F.avg_pool2d(x, 2, ceil_mode=True)
        if self.up:
            return upsample_nearest(x, size)
        return x

    def forward(self, x: Tensor, emb: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        orig = x
        h = self.conv0(self._resample(F.silu(self.norm0(x)), size))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        if self.skip is not None:
            orig = self.skip(self._resample(orig, size))
        x = (h + orig) * SKIP_SCALE
        if self.heads:
            x = (x + self.proj(self._attend(self.norm2(x)))) * SKIP_SCALE
        return x

    def _attend(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, self.heads, c // self.heads, hh * ww).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return out.transpose(-1, -2).reshape(b, c, hh, ww)


class UNet(nn.Module):
    """DDPM++-style U-Net: ``forward(x, noise_label, class_labels=None) -> (B, C, H, W)``.

    x: (B, C, H, W); noise_label: (B,) float; class_labels: (B,) long or None.
    Level i runs at resolution ceil(H / 2^i) (odd sizes are pooled with ceil and upsampled back
    to the exact skip size). ``attn_resolutions`` lists feature-map heights that get attention.
    The output convolution is zero-initialised, so a fresh network returns exactly zero.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: int = 0,
        *,
        channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        embedding: str = "positional",
        channel_mult_emb: int = 4,
        fourier_scale: float = 16.0,
    ) -> None:
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"UNet needs data_shape (C, H, W), got {tuple(data_shape)}")
        if not channel_mult or num_blocks < 1 or channels < 1:
            raise ValueError("UNet needs channels >= 1, num_blocks >= 1 and a non-empty channel_mult")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UNet dropout must be in [0, 1), got {dropout}")
        self.data_shape = tuple(int(s) for s in data_shape)
        self.num_classes = num_classes
        cin, height = self.data_shape[0], self.data_shape[1]
        self.heights = [height]
        for _ in channel_mult[1:]:
            self.heights.append(math.ceil(self.heights[-1] / 2))
        attn = set(int(r) for r in attn_resolutions)
        unknown = attn - set(self.heights)
        if unknown:
            raise ValueError(f"attn_resolutions {sorted(unknown)} not among the U-Net resolutions {self.heights}")

        emb_dim = channels * channel_mult_emb
        self.embed = NoiseEmbedding(embedding, channels, emb_dim, num_classes, fourier_scale)
        block = dict(emb_dim=emb_dim, dropout=dropout)

        self.conv_in = conv(cin, channels * channel_mult[0], 3)
        self.enc = nn.ModuleList()
        skip_ch = [channels * channel_mult[0]]
        cout = skip_ch[0]
        for level, mult in enumerate(channel_mult):
            res = self.heights[level]
            if level > 0:
                self.enc.append(ResBlock(cout, cout, down=True, **block))
                skip_ch.append(cout)
            for _ in range(num_blocks):
                cnew = channels * mult
                self.enc.append(ResBlock(cout, cnew, attention=res in attn, **block))
                cout = cnew
                skip_ch.append(cout)

        self.dec = nn.ModuleList()
        self.dec_skip: list[bool] = []
        self.dec_up: list[int | None] = []
        for level in reversed(range(len(channel_mult))):
            res = self.heights[level]
            if level == len(channel_mult) - 1:
                self._add_dec(ResBlock(cout, cout, attention=True, **block), False, None)
                self._add_dec(ResBlock(cout, cout, **block), False, None)
            else:
                self._add_dec(ResBlock(cout, cout, up=True, **block), False, level)
            for idx in range(num_blocks + 1):
                cnew = channels * channel_mult[level]
                attend = idx == num_blocks and res in attn
                self._add_dec(ResBlock(cout + skip_ch.pop(), cnew, attention=attend, **block), True, None)
                cout = cnew
        self.norm_out = group_norm(cout)
        self.conv_out = conv(cout, cin, 3, scale=0.0)

    def _add_dec(self, blk: ResBlock, takes_skip: bool, up_level: int | None) -> None:
        self.dec.append(blk)
        self.dec_skip.append(takes_skip)
        self.dec_up.append(up_level)

    def forward(self, x: Tensor, noise_label: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.embed(noise_label, x.shape[0], class_labels).to(x.dtype)
        h = self.conv_in(x)
        skips = [h]
        sizes = [tuple(x.shape[-2:])]
        for blk in self.enc:
            h = blk(h, emb)
            if blk.down:
                sizes.append(tuple(h.shape[-2:]))
            skips.append(h)
        for blk, takes_skip, up_level in zip(self.dec, self.dec_skip, self.dec_up):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = blk(h, emb, sizes[up_level] if up_level is not None else None)
        return self.conv_out(F.silu(self.norm_out(h)))

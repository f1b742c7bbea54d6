"""The U-Nets of NVlabs EDM (Karras et al. 2022): DDPM++ / NCSN++ ("songunet") and ADM ("dhariwalunet").

Module and parameter names, shapes and buffers follow the published EDM network pickles (`model.*` of their
preconditioner), so that `lmm convert edm` loads their weights with a strict state dict; the code is our own.
Both nets have lmm's raw-net interface F(x (B, C, H, W), noise_label (B,), class_labels (B,) int64 | None)
-> (B, C, H, W); integer labels become the one-hot vectors EDM feeds its label layer, and a conditional net
called without labels sees zeros, as EDM's preconditioners do. lmm never augments, so a net with augment_dim > 0
feeds its augmentation layer the zero labels of an un-augmented image (EDM's AugmentPipe labels): the output is
EDM's without augmentation, and every parameter takes part in the loss, as DDP requires.

Published configurations (EDM's train.py): DDPM++ = songunet with model_channels 128, channel_mult
[2, 2, 2], positional embedding, standard encoder/decoder, resample_filter [1, 1]; NCSN++ = the same with
fourier embedding, channel_mult_noise 2, residual encoder, resample_filter [1, 3, 3, 1]; ADM = dhariwalunet
with model_channels 192, channel_mult [1, 2, 3, 4]. CIFAR-10 adds augment_dim 9 and dropout 0.13, AFHQv2-64
channel_mult [1, 2, 2, 2] (augment_dim 9, dropout 0.25), ImageNet-64 label_dim 1000 (dropout 0.1, no augment).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def _init(shape: list[int], mode: str, fan_in: int, fan_out: int) -> Tensor:
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (2 * torch.rand(*shape) - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (2 * torch.rand(*shape) - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}; valid: {', '.join(INIT_MODES)}")


class Linear(nn.Module):
    """x (..., in) -> (..., out) with weight (out, in) and optional bias (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1.0, init_bias: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """3x3/1x1 convolution (kernel 0: none) with optional 2x up/down-sampling by the separable FIR filter
    `resample_filter` (buffer (1, 1, k, k), present only when resampling); fused_resample folds the
    resampling into the convolution's padding (NCSN++'s residual encoder)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: list[int] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0) -> None:
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, (4 * f).tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2,
                                   padding=w_pad + f_pad)
            x = F.conv2d(x, w)
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (4 * f).tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group norm with min(num_groups, C // min_channels_per_group) groups; weight, bias (C,)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """Residual block (GroupNorm, SiLU, conv, embedding affine, conv, skip) with optional up/down-sampling and
    multi-head self-attention; x (B, in, H, W), emb (B, emb_channels) -> (B, out, H', W')."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: list[int] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
                 init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None) -> None:
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else {"init_weight": 0}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = 0 if not attention else (num_heads or out_channels // channels_per_head)
        if self.num_heads and out_channels % self.num_heads:
            raise ValueError(f"an attention block of {out_channels} channels cannot be split into {self.num_heads} heads"
                             + ("" if num_heads else f" of {channels_per_head} channels (model_channels x channel_mult "
                                f"must be a multiple of {channels_per_head} at the attention resolutions)"))
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter,
                               **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (orig if self.skip is None else self.skip(orig))) * self.skip_scale
        if self.num_heads:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            x = (self.proj(a.transpose(1, 2).reshape(b, c, h, w)) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding (B,) -> (B, num_channels): [cos(x f_i), sin(x f_i)], f_i = max_positions^(-i/n)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        x = torch.outer(x, ((1 / self.max_positions) ** freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (B,) -> (B, num_channels) with a fixed buffer `freqs` (num_channels / 2,)."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _check_image_shape(kind: str, data_shape: tuple[int, ...], levels: int) -> tuple[int, int]:
    if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
        raise ValueError(f"net {kind}: needs square images (C, H, H), got data shape {tuple(data_shape)}")
    channels, res = int(data_shape[0]), int(data_shape[1])
    if res % (1 << (levels - 1)):
        raise ValueError(f"net {kind}: resolution {res} is not divisible by 2^{levels - 1} "
                         f"(channel_mult has {levels} levels)")
    return channels, res


def _one_hot(y: Tensor | None, label_dim: int, like: Tensor) -> Tensor:
    if y is None:
        return like.new_zeros(like.shape[0], label_dim)
    return F.one_hot(y.long(), label_dim).to(like.dtype)


def _label_dropout(labels: Tensor, p: float, training: bool) -> Tensor:
    if not (training and p):
        return labels
    return labels * (torch.rand(labels.shape[0], 1, device=labels.device) >= p).to(labels.dtype)


def _no_augmentation(map_augment: Linear | None, emb: Tensor) -> Tensor:
    """emb (B, E) plus the augmentation layer's output for all-zero augmentation labels (B, augment_dim)."""
    if map_augment is None:
        return emb
    return emb + map_augment(emb.new_zeros(emb.shape[0], map_augment.in_features))


def _decoder_level(dec: nn.ModuleDict, res: int, lowest: bool, cout: int, out_ch: int, skips: list[int],
                   attention: list[bool], block: dict) -> int:
    """Add one decoder level of EDM's U-Nets to `dec`: at the lowest resolution in0 (attention) + in1, elsewhere
    an up-sampling block, then len(attention) blocks that each take one skip, block i with attention[i]. Returns
    the level's output channels."""
    if lowest:
        dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
        dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
    else:
        dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
    for idx, attn in enumerate(attention):
        cin, cout = cout + skips.pop(), out_ch
        dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
    return cout


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net (Song et al. 2021, as configured by EDM); see the module docstring."""

    def __init__(self, data_shape: tuple[int, ...], num_classes: int = 0, *, model_channels: int = 128,
                 channel_mult: list[int] = (2, 2, 2), channel_mult_emb: int = 4, num_blocks: int = 4,
                 attn_resolutions: list[int] = (16,), dropout: float = 0.10, label_dropout: float = 0.0,
                 augment_dim: int = 0, embedding_type: str = "positional", channel_mult_noise: int = 1,
                 encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: list[int] = (1, 1)) -> None:
        super().__init__()
        choices = {"embedding_type": (embedding_type, ("positional", "fourier")),
                   "encoder_type": (encoder_type, ("standard", "skip", "residual")),
                   "decoder_type": (decoder_type, ("standard", "skip"))}
        for key, (value, valid) in choices.items():
            if value not in valid:
                raise ValueError(f"net songunet: {key}={value!r}; valid: {', '.join(valid)}")
        in_ch, res0 = _check_image_shape("songunet", data_shape, len(channel_mult))
        self.data_shape, self.num_classes = tuple(data_shape), int(num_classes)
        self.label_dropout = label_dropout
        emb_ch, noise_ch = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_ch, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=init,
                     init_zero=init_zero, init_attn=init_attn)

        self.map_noise = (PositionalEmbedding(noise_ch, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_ch))
        self.map_label = Linear(num_classes, noise_ch, **init) if num_classes else None
        self.map_augment = Linear(augment_dim, noise_ch, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_ch, emb_ch, **init)
        self.map_layer1 = Linear(emb_ch, emb_ch, **init)

        self.enc = nn.ModuleDict()
        cout = caux = in_ch
        for level, mult in enumerate(channel_mult):
            res = res0 >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3, **init)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = res0 >> level
            cout = _decoder_level(self.dec, res, level == len(channel_mult) - 1, cout, model_channels * mult, skips,
                                  [i == num_blocks and res in attn_resolutions for i in range(num_blocks + 1)], block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(in_ch, in_ch, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, in_ch, 3, **init_zero)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.map_noise(noise_labels.to(x.dtype).expand(x.shape[0]))
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)
        emb = _no_augmentation(self.map_augment, emb)
        if self.map_label is not None:
            labels = _label_dropout(_one_hot(class_labels, self.num_classes, x), self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.num_classes))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        out = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                out = block(out)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                out = tmp if out is None else tmp + out
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out


class DhariwalUNet(nn.Module):
    """ADM U-Net (Dhariwal & Nichol 2021, as configured by EDM); see the module docstring."""

    def __init__(self, data_shape: tuple[int, ...], num_classes: int = 0, *, model_channels: int = 192,
                 channel_mult: list[int] = (1, 2, 3, 4), channel_mult_emb: int = 4, num_blocks: int = 3,
                 attn_resolutions: list[int] = (32, 16, 8), dropout: float = 0.10, label_dropout: float = 0.0,
                 augment_dim: int = 0) -> None:
        super().__init__()
        in_ch, res0 = _check_image_shape("dhariwalunet", data_shape, len(channel_mult))
        self.data_shape, self.num_classes = tuple(data_shape), int(num_classes)
        self.label_dropout = label_dropout
        emb_ch = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_ch, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_ch, **init)
        self.map_layer1 = Linear(emb_ch, emb_ch, **init)
        self.map_label = (Linear(num_classes, emb_ch, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(num_classes)) if num_classes else None)

        self.enc = nn.ModuleDict()
        cout = in_ch
        for level, mult in enumerate(channel_mult):
            res = res0 >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels * mult, 3, **init)
                cout = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = res0 >> level
            cout = _decoder_level(self.dec, res, level == len(channel_mult) - 1, cout, model_channels * mult, skips,
                                  [res in attn_resolutions] * (num_blocks + 1), block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, in_ch, 3, **init_zero)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = _no_augmentation(self.map_augment, self.map_noise(noise_labels.to(x.dtype).expand(x.shape[0])))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(
                _label_dropout(_one_hot(class_labels, self.num_classes, x), self.label_dropout, self.training))
        emb = F.silu(emb)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


# The published EDM networks (edm-<name>-vp / -adm pickles): (net kind, net config, data shape, classes).
PUBLISHED = {
    "cifar10-32x32-uncond": ("songunet", dict(augment_dim=9, dropout=0.13), (3, 32, 32), 0),
    "cifar10-32x32-cond": ("songunet", dict(augment_dim=9, dropout=0.13), (3, 32, 32), 10),
    "afhqv2-64x64-uncond": ("songunet", dict(channel_mult=[1, 2, 2, 2], augment_dim=9, dropout=0.25),
                            (3, 64, 64), 0),
    "imagenet-64x64-cond": ("dhariwalunet", dict(dropout=0.1), (3, 64, 64), 1000),
}

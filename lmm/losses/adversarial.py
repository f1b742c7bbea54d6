"""Adversarial loss on the predicted endpoint, with a projected discriminator (Sauer et al. 2021).

The discriminator sees images through the frozen EfficientNet-Lite0 pyramid (lmm.nets.pyramid), a fixed
random 1x1 cross-channel mixing per scale, and small trainable heads per scale whose patch logits are
averaged; conditional runs add a projection term <embed(y), pooled features> per scale. Both sides go through
the same differentiable augmentation (DiffAugment, Zhao et al. 2020). Hinge loss; optional R1 penalty on reals.
The real side is dataset images (`reals`, a BatchSource of {"x", "y"}); the fake side is the student's
prediction at the line times it trains on, taken from the main phase of the same step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmm.losses.base import LossTerm
from lmm.registry import option

AUGMENTS = ("translation", "cutout", "color")


def _shift_matrix(shift: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """(B, n, n) one-hot rows for shift (B,): [b, i, j] = 1 where j = i + shift[b], else 0."""
    i = torch.arange(n, device=shift.device)
    return (i == i[:, None] + shift.view(-1, 1, 1)).to(dtype)


def translate(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """x (B, C, H, W) translated per sample, zero filled: out[b, :, i, j] = x[b, :, i + dy[b], j + dx[b]] where that
    pixel is inside x, else 0; dy, dx (B,) integers. By indexing; with deterministic algorithms on (run.deterministic)
    as S_y @ x @ S_x^T with one-hot shift matrices, exact (each output is one input times 1; float32 matmuls must
    not use TF32, which lmm.dist.set_kernels turns off), whose backward pass is matmuls too: deterministic on GPUs,
    unlike an index's."""
    if not torch.are_deterministic_algorithms_enabled():
        b, _, h, w = x.shape
        gy = (torch.arange(h, device=x.device).view(1, h, 1) + dy.view(b, 1, 1)).clamp(-1, h)
        gx = (torch.arange(w, device=x.device).view(1, 1, w) + dx.view(b, 1, 1)).clamp(-1, w)
        padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)
        return padded[torch.arange(b, device=x.device).view(b, 1, 1), gy + 1, gx + 1].permute(0, 3, 1, 2)
    sy = _shift_matrix(dy, x.shape[-2], x.dtype)[:, None]
    sx = _shift_matrix(dx, x.shape[-1], x.dtype)[:, None]
    with torch.autocast(x.device.type, enabled=False):
        return sy @ x @ sx.transpose(-1, -2)


def diff_augment(x: Tensor, policy: tuple[str, ...]) -> Tensor:
    """DiffAugment of x (B, C, H, W) in [-1, 1]: colour (brightness, saturation, contrast), translation by up to
    1/8 of the side (zero padded) and cutout of a square of half the side; randomness from the global RNG."""
    b = x.shape[0]
    if "color" in policy:
        x = x + (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)
        mean = x.mean(1, keepdim=True)
        x = (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean
    h, w = x.shape[-2:]
    if "translation" in policy:
        sh, sw = max(1, h // 8), max(1, w // 8)
        dy = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device)
        dx = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device)
        x = translate(x, dy.view(b), dx.view(b))
    if "cutout" in policy:
        ch, cw = h // 2, w // 2
        cy = torch.randint(0, h + 1 - ch % 2, (b, 1, 1), device=x.device)
        cx = torch.randint(0, w + 1 - cw % 2, (b, 1, 1), device=x.device)
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        keep = ((ys - cy).abs() >= ch // 2 + 1) | ((xs - cx).abs() >= cw // 2 + 1)
        x = x * keep.unsqueeze(1).to(x.dtype)
    return x


class ProjectedDiscriminator(nn.Module):
    """features: list of (B, C_k, H_k, W_k) from the frozen pyramid -> logits (B,), mean over scales of the
    mean patch logit of each scale's head. mix: fixed random 1x1 convs (buffers), heads: trainable; both drawn
    from `seed`, so a run's discriminator starts the same every time."""

    def __init__(self, in_channels: list[int], width: int = 64, num_classes: int = 0, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        for k, c in enumerate(in_channels):
            self.register_buffer(f"mix{k}", torch.randn(width, c, 1, 1, generator=gen) / math.sqrt(c))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.heads = nn.ModuleList(
                nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(width, 1, 1))
                for _ in in_channels)
            self.embed = nn.ModuleList(nn.Embedding(num_classes, width) for _ in in_channels) if num_classes else None
        self.num_scales = len(in_channels)

    def forward(self, features: list[Tensor], y: Tensor | None = None) -> Tensor:
        logits = []
        for k, f in enumerate(features):
            h = F.conv2d(f, getattr(self, f"mix{k}"))
            h = F.leaky_relu(h, 0.2)
            out = self.heads[k](h).mean((1, 2, 3))
            if self.embed is not None and y is not None:
                out = out + (self.embed[k](y) * h.mean((2, 3))).sum(1) / math.sqrt(h.shape[1])
            logits.append(out)
        return torch.stack(logits).mean(0)


class Adversarial(LossTerm):
    """Generator side: hinge -D(aug(pred)) per sample, from step `start` on (0 before). Options
    (`student.adversarial`): start, lr (discriminator), interval (a discriminator step every `interval`
    student steps), r1 (R1 weight, 0 = off), augment (DiffAugment policies), resolution (the pyramid's input
    side), width (channels of the mixing and heads), seed (the fixed mixing), adaptive (false: the term's
    weight is used as is; true: it is relative, the adversarial gradient on the prediction getting `weight`
    times the norm of the other terms', see lmm.objectives.lines.Lines)."""

    name = "adversarial"

    @dataclass(frozen=True)
    class Options:
        start: int = option(0, min=0)
        lr: float = option(2e-4, min=1e-12)
        interval: int = option(1, min=1)
        r1: float = option(0.0, min=0.0)
        augment: tuple[str, ...] = option(AUGMENTS, choices=AUGMENTS)
        resolution: int = option(64, min=32)
        width: int = option(64, min=1)
        seed: int = option(0, min=0)
        adaptive: bool = option(False)

    def __init__(self, start: int = Options.start, lr: float = Options.lr, interval: int = Options.interval,
                 r1: float = Options.r1, augment: list[str] | tuple[str, ...] = Options.augment,
                 resolution: int = Options.resolution, width: int = Options.width, seed: int = Options.seed,
                 adaptive: bool = Options.adaptive) -> None:
        super().__init__()
        bad = [a for a in augment if a not in AUGMENTS]
        if bad:
            raise ValueError(f"student.adversarial.augment: unknown {bad}; valid: {', '.join(AUGMENTS)}")
        if start < 0 or lr <= 0 or interval < 1 or r1 < 0:
            raise ValueError(f"student.adversarial: need start >= 0, lr > 0, interval >= 1, r1 >= 0; got start={start}, "
                             f"lr={lr}, interval={interval}, r1={r1}")
        self.start, self.lr, self.interval, self.r1 = start, lr, interval, r1
        self.augment, self.resolution, self.width, self.seed = tuple(augment), resolution, width, seed
        self.adaptive = bool(adaptive)
        self.disc: ProjectedDiscriminator | None = None
        self.reals: Any = None
        self._real_loader: Any = None
        self._fake: dict[str, Any] = {}

    def setup(self, data_shape: tuple[int, ...], num_classes: int, reals: Any = None, shared: dict | None = None
              ) -> None:
        from lmm.nets.pyramid import shared_pyramid

        if len(data_shape) != 3:
            raise ValueError(f"the adversarial loss needs image data (C, H, W), not shape {data_shape}")
        if reals is None:
            raise ValueError("the adversarial loss needs dataset images (reals) for its discriminator")
        self.__dict__["reals"] = reals
        self.features = shared_pyramid(self.resolution, shared)
        self.disc = ProjectedDiscriminator(self.features.channels, self.width, num_classes, self.seed)
        self.num_classes = num_classes

    def logits(self, disc: nn.Module, x: Tensor, y: Tensor | None, augment: bool = True) -> Tensor:
        """(B,) discriminator logits of images x (B, C, H, W) in [-1, 1], augmented as in training unless `augment`
        is False."""
        x = diff_augment(x, self.augment) if augment else x
        return disc(self.features(x), y if self.num_classes else None)

    def networks(self) -> list[nn.Module]:
        return [] if self.disc is None else [self.features, self.disc]

    def _real_batch(self, step: int, rank: int, world: int, batch_size: int, device: torch.device
                    ) -> dict[str, Tensor]:
        """The reals {"x", "y" when labelled} of the discriminator phase at `step` on `device`; those of its next
        step (step + interval) are read meanwhile (lmm.data.prefetch.Prefetcher)."""
        from lmm.data.prefetch import Prefetcher

        key = (rank, world, batch_size, device)
        loader = self._real_loader
        if loader is None or (loader.rank, loader.world, loader.batch_size, loader.device) != key:
            loader = self._real_loader = Prefetcher(self.reals, *key)
        return loader.batch(step, step + self.interval)

    def forward(self, pred: Tensor, target: Tensor, ctx: dict[str, Any]) -> Tensor:
        if self.disc is None:
            raise RuntimeError("Adversarial.setup() must run before the loss is used")
        self._fake = {"x": pred.detach(), "y": ctx.get("y"), "step": ctx["step"]}
        if ctx["step"] < self.start:
            return pred.new_zeros(pred.shape[0])
        return -self.logits(self.disc, pred, ctx.get("y"))

    def disc_loss(self, disc: nn.Module, batch: dict[str, Tensor], step: int, rank: int, world: int) -> Tensor:
        """Hinge loss of the discriminator on this step's reals and the main phase's fakes, (B,) (+ R1); reals
        and fakes go through it as one (2B, C, H, W) batch."""
        fake = self._fake
        if fake.get("step") != step:
            raise RuntimeError(f"the discriminator phase at step {step} has no fakes from that step's main phase")
        b = fake["x"].shape[0]
        real = self._real_batch(step, rank, world, b, fake["x"].device)
        x_real = real["x"].requires_grad_(self.r1 > 0)
        y = torch.cat([real["y"], fake["y"]]) if self.num_classes else None
        logits = self.logits(disc, torch.cat([x_real, fake["x"]]), y)
        d_real = logits[:b]
        loss = F.relu(1 - d_real) + F.relu(1 + logits[b:])
        if self.r1 > 0:
            (grad,) = torch.autograd.grad(d_real.sum(), x_real, create_graph=True)
            loss = loss + 0.5 * self.r1 * grad.square().flatten(1).sum(1)
        return loss

    def phases(self) -> list:
        from lmm.train import Phase

        if self.disc is None:
            raise RuntimeError("Adversarial.setup() must run before its phases are taken")
        return [Phase(name="disc", net=self.disc, loss=self.disc_loss, lr=self.lr, interval=self.interval,
                      start=self.start)]

"""2-D toy distributions (moons, 8 Gaussians, checkerboard) as float32 points."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lmm.data.arrays import ImageData

TOY_KINDS = ("moons", "8gaussians", "checkerboard")


def make_toy(kind: str = "moons", n: int = 10000, seed: int = 0) -> Tensor:
    """(n, 2) float32 samples of a 2-D toy distribution, each coordinate roughly unit variance."""
    if n <= 0:
        raise ValueError(f"toy n={n}; must be positive")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    if kind == "moons":
        from sklearn.datasets import make_moons

        x, _ = make_moons(n_samples=n, noise=0.05, random_state=seed)
        x = (x - np.array([0.5, 0.25])) / np.array([0.867, 0.497])
    elif kind == "8gaussians":
        std = 0.1
        radius = math.sqrt(2.0 * (1.0 - std**2))
        angles = rng.integers(0, 8, size=n) * (2 * math.pi / 8)
        centers = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        x = centers + std * rng.standard_normal((n, 2))
    elif kind == "checkerboard":
        a = rng.uniform(-2.0, 2.0, size=n)
        b = rng.uniform(0.0, 1.0, size=n) - 2.0 * rng.integers(0, 2, size=n) + np.floor(a) % 2
        x = np.stack([a, b], axis=1) * (math.sqrt(3.0) / 2.0)
    else:
        raise ValueError(f"toy kind={kind!r}; valid: {list(TOY_KINDS)}")
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


def load_toy(kind: str = "moons", n: int = 10000, seed: int = 0) -> ImageData:
    """A 2-D toy as ImageData: float32 (n, 2), unlabelled."""
    return ImageData(images=make_toy(kind, n, seed), y=None, num_classes=0, name=f"toy-{kind}")

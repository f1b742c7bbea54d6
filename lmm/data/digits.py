"""sklearn's 8x8 digits, kept as float32 in model units."""
from __future__ import annotations

import numpy as np
import torch

from lmm.data.arrays import ImageData


def load_digits() -> ImageData:
    """sklearn's 8x8 digits: float32 (1797, 1, 8, 8), values 0..16 mapped by v/8 - 1, 10 classes."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    y = torch.from_numpy(d.target.astype(np.int64))
    return ImageData(images=x, y=y, num_classes=10, name="digits")

"""EDM denoising objective (Karras et al. 2022)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmm.losses.l2 import l2
from lmm.nets.precond import EDMDenoiser
from lmm.objectives.base import Objective, bcast


class EDMLoss(Objective):
    """Denoising loss of a denoiser with the coefficients of `denoiser` (lmm.nets.precond.edm_coefficients):
    L = lambda(sigma) mean over dims of (D(x + sigma n; sigma) - x)^2, ln sigma ~ N(P_mean, P_std^2),
    lambda = (sigma^2 + sd^2) / (sigma sd)^2. (EDM sums over dims; the mean only rescales by dim.)"""

    name = "edm"
    required_keys = ("x",)

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, denoiser: str = "edm") -> None:
        super().__init__()
        self.denoiser = denoiser
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.sigma_data = float(sigma_data)

    def build_model(self, net: nn.Module) -> nn.Module:
        return EDMDenoiser(net, sigma_data=self.sigma_data, denoiser=self.denoiser)

    def forward(self, model: nn.Module, batch: dict[str, Tensor], step: int = 0) -> Tensor:
        self._check_batch(batch)
        x = batch["x"]
        sigma = (self.P_mean + self.P_std * torch.randn(x.shape[0], dtype=x.dtype, device=x.device)).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        noisy = x + bcast(sigma, x) * torch.randn_like(x)
        return weight * l2(model(noisy, sigma, batch.get("y")), x)

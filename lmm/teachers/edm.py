"""EDM teacher (Karras et al. 2022): time sigma, preconditioned denoiser, rho-schedule grid."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmm.nets.precond import bcast, batch_times, edm_line_scale
from lmm.teachers.base import Teacher


class EDMTeacher(Teacher):
    """Probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from sigma_max z down to sigma = 0.

    grid(N, "edm"): EDM's sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i = 0..N-1,
    then 0 (N intervals; N = 1 gives [sigma_max, 0]): its last call is at sigma_min, where a step to 0 changes
    next to nothing, so few-step samplers waste it. grid(N, "trimmed"): the same schedule over N + 1 points,
    i/N instead of i/(N-1), with its last point (sigma_min) replaced by 0, so every call moves the sample.
    The velocity is undefined at sigma = 0 (singular_end).
    """

    kind = "edm"
    objective = "edm"
    line_precond = "edm"
    ode_keys = ("sigma_min", "sigma_max", "rho")
    reads = (*ode_keys, "sigma_data", "P_mean", "P_std", "denoiser")
    singular_end = True

    @classmethod
    def training_objective(cls, tcfg: dict) -> Any:
        from lmm.objectives import get_objective

        return get_objective(cls.objective, sigma_data=tcfg["sigma_data"], P_mean=tcfg["P_mean"],
                             P_std=tcfg["P_std"], denoiser=tcfg["denoiser"])

    def __init__(self, model: nn.Module, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> None:
        super().__init__(model)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDM teacher needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.rho = float(rho)

    def grid(self, steps: int, schedule: str = "edm") -> Tensor:
        steps = self._check_grid_args(steps, schedule)
        if steps == 1:
            return torch.tensor([self.sigma_max, 0.0], dtype=torch.float64)
        i = torch.arange(steps, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sigmas = (hi + i / (steps - 1 if schedule == "edm" else steps) * (lo - hi)) ** self.rho
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    def prior(self, z: Tensor, grid: Tensor) -> Tensor:
        return float(grid[0]) * z

    def velocity(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return (x - self._call_model(x, t, y)) / float(t)

    def endpoint_from_velocity(self, x: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return x - float(t) * v

    def endpoint(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self._call_model(x, t, y)

    def line_endpoint(self, x_t: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        scale, sigma = edm_line_scale(batch_times(t, x_t), self.sigma_max)
        return self._call_model(bcast(scale, x_t).to(x_t.dtype) * x_t, sigma, y)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), t

"""2-rectified flow (Liu et al. 2023, "reflow"): flow matching on the teacher's pairs instead of independent ones."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmm.losses.l2 import l2
from lmm.nets.precond import LinesModel, check_precond
from lmm.objectives.base import Objective, line_point, student_precond

T_MAX = 0.999


class Reflow(Objective):
    """L = mean over dims of (v(x_t, t) - (x1 - z))^2, x_t = (1-t) z + t x1 on pairs {"z", "x1", "y" optional},
    t ~ U[0, T_MAX] (the velocity is the endpoint prediction's (x1_hat - x_t) / (1 - t), which is ill-conditioned
    at t = 1).

    The model is a LinesModel (precond and its constants as in lmm.objectives.lines.Lines), so the line sampler
    on the uniform grid is exactly Euler on the learned velocity: x_{k+1} = x_k + (t_{k+1} - t_k) v(x_k, t_k).
    """

    name = "reflow"
    required_keys = ("z", "x1")

    def __init__(self, precond: str = "velocity", sigma_data: float = 0.5, sigma_max: float = 80.0,
                 denoiser: str = "edm") -> None:
        super().__init__()
        self.precond, self.sigma_data, self.sigma_max, self.denoiser = precond, float(sigma_data), float(sigma_max), denoiser
        check_precond(precond, denoiser)

    reads = ("precond", "sigma_data", "window")

    @classmethod
    def from_config(cls, scfg: dict, tcfg: dict | None) -> Reflow:
        return cls(**student_precond(scfg["precond"], scfg["sigma_data"], tcfg))

    def build_model(self, net: nn.Module) -> nn.Module:
        return LinesModel(net, self.sigma_data, self.precond, self.sigma_max, self.denoiser)

    def forward(self, model: nn.Module, batch: dict[str, Tensor], step: int = 0) -> Tensor:
        self._check_batch(batch)
        z, x1 = batch["z"], batch["x1"]
        t = T_MAX * torch.rand(x1.shape[0], dtype=x1.dtype, device=x1.device)
        x_t = line_point(z, x1, t)
        return l2(model.velocity(x_t, t, batch.get("y")), x1 - z)

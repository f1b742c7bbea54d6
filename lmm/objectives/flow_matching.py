"""Flow matching on the linear path x_t = (1-t) z + t x with velocity target x - z, and its coupling hook."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmm.losses.l2 import l2
from lmm.nets.precond import VelocityModel
from lmm.objectives.base import Objective, line_point, sample_times

TIME_SAMPLINGS = ("uniform", "logit_normal")


class FlowMatching(Objective):
    """L = mean over dims of (v(x_t, t) - (x - z))^2 with z ~ N(0, I) paired with x by `couple` (independent
    here), x_t = (1-t) z + t x (+ sigma eps), t ~ U(0, 1) or logit-normal. Subclasses change the coupling
    (lmm.objectives.ot_cfm) and the model (`velocity` reads the velocity off it)."""

    name = "flow_matching"
    required_keys = ("x",)

    def __init__(self, time_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0) -> None:
        super().__init__()
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r} for flow_matching; valid: {', '.join(TIME_SAMPLINGS)}")
        self.time_sampling = time_sampling
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.sigma = 0.0

    def build_model(self, net: nn.Module) -> nn.Module:
        return VelocityModel(net)

    def couple(self, z: Tensor, x: Tensor) -> Tensor:
        """z (B, ...) re-ordered so that z[i] travels to x[i]: the independent coupling keeps it as drawn."""
        return z

    def velocity(self, model: nn.Module, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """The model's velocity at x_t (B, ...), t (B,)."""
        return model(x_t, t, y)

    def forward(self, model: nn.Module, batch: dict[str, Tensor], step: int = 0) -> Tensor:
        self._check_batch(batch)
        x = batch["x"]
        z = self.couple(torch.randn_like(x), x)
        t = sample_times(x.shape[0], self.time_sampling, self.logit_mean, self.logit_std, x)
        x_t = line_point(z, x, t)
        if self.sigma > 0:
            x_t = x_t + self.sigma * torch.randn_like(x)
        return l2(self.velocity(model, x_t, t, batch.get("y")), x - z)

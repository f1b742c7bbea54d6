"""Flow matching on the linear path x_t = (1-t) z + t x with velocity target x - z."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmm.losses.l2 import l2
from lmm.nets.precond import VelocityModel
from lmm.objectives.base import Objective, bcast, sample_times

TIME_SAMPLINGS = ("uniform", "logit_normal")


class FlowMatching(Objective):
    """L = mean over dims of (v(x_t, t) - (x - z))^2 with z ~ N(0, I), t ~ U(0, 1) or logit-normal."""

    name = "flow_matching"
    required_keys = ("x",)

    def __init__(self, time_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0) -> None:
        super().__init__()
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r} for flow_matching; valid: {', '.join(TIME_SAMPLINGS)}")
        self.time_sampling = time_sampling
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)

    def build_model(self, net: nn.Module) -> nn.Module:
        return VelocityModel(net)

    def forward(self, model: nn.Module, batch: dict[str, Tensor], step: int = 0) -> Tensor:
        self._check_batch(batch)
        x = batch["x"]
        z = torch.randn_like(x)
        t = sample_times(x.shape[0], self.time_sampling, self.logit_mean, self.logit_std, x)
        x_t = bcast(1 - t, x) * z + bcast(t, x) * x
        return l2(model(x_t, t, batch.get("y")), x - z)

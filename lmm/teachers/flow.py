"""Flow-matching teacher: linear path x_t = (1-t) z + t x, time t in [0, 1], velocity model."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmm.nets.precond import bcast, batch_times
from lmm.teachers.base import Teacher

SPACINGS = ("uniform", "quadratic")


class FlowTeacher(Teacher):
    """ODE dx/dt = v(x, t) of a VelocityModel from z at t=0 to data at t=1.

    spacing: "uniform" grid, or "quadratic" t_i = 1 - (1 - i/N)^2 (denser toward the data end).
    """

    kind = "flow"
    objective = "flow_matching"
    line_precond = "velocity"
    singular_end = False

    def __init__(self, model: nn.Module, spacing: str = "uniform") -> None:
        super().__init__(model)
        if spacing not in SPACINGS:
            raise ValueError(f"unknown flow grid spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
        self.spacing = spacing

    def grid(self, steps: int, schedule: str = "edm") -> Tensor:
        """Its spacing's grid; it ends at t = 1 and spends no call there, so both schedules give the same grid."""
        steps = self._check_grid_args(steps, schedule)
        u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        return u if self.spacing == "uniform" else 1 - (1 - u) ** 2

    def prior(self, z: Tensor, grid: Tensor) -> Tensor:
        return z

    def velocity(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self._call_model(x, t, y)

    def endpoint_from_velocity(self, x: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return x + float(1 - t) * v

    def line_endpoint(self, x_t: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        t = batch_times(t, x_t)
        return x_t + bcast(1 - t, x_t).to(x_t.dtype) * self._call_model(x_t, t, y)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return t, 1 - t

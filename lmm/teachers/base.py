"""Teacher interface: a preconditioned model plus the ODE it defines, and `sample_teacher`."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmm.nets.precond import batch_times
from lmm.solvers import Solution, solve


class Teacher(nn.Module):
    """An ODE from noise (grid[0]) to data (grid[-1]) in the teacher's own time variable.

    Subclasses set `kind`, `objective` (the objective name its model trains with) and `singular_end`,
    and implement grid, prior, velocity and endpoint_from_velocity.
    """

    kind: str
    objective: str
    singular_end: bool = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def grid(self, steps: int) -> Tensor:
        """(steps+1,) float64 times; grid[0] is the noise end, grid[-1] the data end."""
        raise NotImplementedError

    def prior(self, z: Tensor, grid: Tensor) -> Tensor:
        """State at grid[0] from unit noise z (B, ...)."""
        raise NotImplementedError

    def velocity(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """dx/dt at state x (B, ...) and scalar time t, (B, ...)."""
        raise NotImplementedError

    def endpoint_from_velocity(self, x: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """The data-end prediction implied by velocity v at (x, t), (B, ...)."""
        raise NotImplementedError

    def to_line(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """State x (B, ...) at teacher time t (scalar) in the line convention x_s = (1-s) z + s x1: (x_s, s)."""
        return x, t

    def endpoint(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The teacher's prediction of the data endpoint at (x, t), (B, ...)."""
        return self.endpoint_from_velocity(x, t, self.velocity(x, t, y))

    def _call_model(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """Model output for state x (B, ...) at scalar time t, computed in float32, returned in x's dtype."""
        xf = x.to(torch.float32)
        return self.model(xf, batch_times(t, xf), y).to(x.dtype)


@torch.no_grad()
def sample_teacher(
    teacher: Teacher,
    z: Tensor,
    steps: int,
    method: str,
    y: Tensor | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
) -> Solution:
    """Deterministic teacher sample x1 (B, ...) from unit noise z (B, ...) on teacher.grid(steps).

    The teacher runs in eval mode (its previous mode is restored). With return_trajectory the
    Solution holds the steps+1 states on the grid and, in `endpoints`, the teacher's endpoint
    prediction at grid[0..steps-1], derived from each step's first velocity evaluation (no extra NFE).
    """
    grid = teacher.grid(steps)
    endpoints: list[Tensor] | None = [] if return_trajectory else None

    def record(k: int, x: Tensor, t: Tensor, v: Tensor) -> None:
        endpoints.append(teacher.endpoint_from_velocity(x, t, v))

    was_training = teacher.training
    teacher.eval()
    try:
        sol = solve(
            lambda x, t: teacher.velocity(x, t, y),
            teacher.prior(z, grid),
            grid,
            method=method,
            singular_end=teacher.singular_end,
            return_trajectory=return_trajectory,
            progress=progress,
            callback=record if return_trajectory else None,
        )
    finally:
        teacher.train(was_training)
    sol.endpoints = endpoints
    return sol

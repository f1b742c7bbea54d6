"""Teacher interface: a preconditioned model plus the ODE it defines, and `sample_teacher`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lmm.nets.precond import batch_times
from lmm.solvers import DPM_METHODS, Solution, dpm_solver, solve

SCHEDULES = ("edm", "trimmed")
TEACHER_KEYS_ALWAYS_READ = ("kind", "solver", "steps", "schedule", "net", "train")


class Teacher(nn.Module):
    """An ODE from noise (grid[0]) to data (grid[-1]) in the teacher's own time variable.

    Subclasses set `kind`, `objective` (the name of the objective its model trains with, in
    lmm.objectives.OBJECTIVES), `line_precond` (the lmm.nets.precond.LinesModel parameterisation that writes their
    model on the line), `ode_keys` (the keys of config section `teacher` its constructor takes) and
    `singular_end`, and implement grid, prior, velocity, endpoint_from_velocity, line_endpoint and alpha_sigma;
    `training_objective` builds the objective from the `teacher` section.
    """

    kind: str
    objective: str
    line_precond: str
    ode_keys: ClassVar[tuple[str, ...]] = ()
    # the keys of config section `teacher` its ODE and training objective read, besides TEACHER_KEYS_ALWAYS_READ
    reads: ClassVar[tuple[str, ...]] = ()
    singular_end: bool = False
    # False for kinds that lmm loads from another tool's folders (owns_folder / load_folder) and never trains
    trainable: ClassVar[bool] = True

    @classmethod
    def owns_folder(cls, path: Path) -> bool:
        """Whether the folder `path` holds a model in this kind's own format (kinds stored as lmm model files: no)."""
        return False

    @classmethod
    def load_folder(cls, path: Path, device: str | torch.device = "cpu") -> tuple[Teacher, dict]:
        """(teacher in eval mode on `device`, meta like an lmm teacher file's) of a folder this kind owns."""
        raise NotImplementedError(f"teacher kind {cls.kind!r} is not loaded from folders")

    @classmethod
    def training_objective(cls, tcfg: dict) -> Any:
        """The lmm.objectives.Objective that trains this kind's model, from config section `teacher`."""
        from lmm.objectives import get_objective

        return get_objective(cls.objective)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def grid(self, steps: int, schedule: str = "edm") -> Tensor:
        """(steps+1,) float64 times; grid[0] is the noise end, grid[-1] the data end. schedule: one of SCHEDULES."""
        raise NotImplementedError

    @staticmethod
    def _check_grid_args(steps: int, schedule: str) -> int:
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"teacher solver steps must be an integer >= 1, got {steps!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown teacher schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        return int(steps)

    def prior(self, z: Tensor, grid: Tensor) -> Tensor:
        """State at grid[0] from unit noise z (B, ...)."""
        raise NotImplementedError

    def velocity(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """dx/dt at state x (B, ...) and scalar time t, (B, ...)."""
        raise NotImplementedError

    def endpoint_from_velocity(self, x: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """The data-end prediction implied by velocity v at (x, t), (B, ...)."""
        raise NotImplementedError

    def endpoint(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The teacher's prediction of the data endpoint at (x, t), (B, ...)."""
        return self.endpoint_from_velocity(x, t, self.velocity(x, t, y))

    def line_endpoint(self, x_t: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """The teacher's endpoint prediction at the point x_t (B, ...) of the line x_t = (1-t) z + t x1,
        line time t scalar or (B,): the one-step predictor a student with the teacher's own parameterisation
        (lmm.nets.precond.LinesModel, precond = `line_precond`) equals at initialisation."""
        raise NotImplementedError

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha, sigma) of the teacher's path x = alpha x1 + sigma z at teacher times t, for multistep solvers."""
        raise NotImplementedError

    def _call_model(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """Model output for state x (B, ...) at time t (scalar or (B,)), computed in float32, returned in x's dtype."""
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
    schedule: str = "edm",
) -> Solution:
    """Deterministic teacher sample x1 (B, ...) from unit noise z (B, ...) on teacher.grid(steps, schedule),
    with a Runge-Kutta method of lmm.solvers.solve or "dpm++2m" / "dpm++3m" (lmm.solvers.dpm_solver on the teacher's
    endpoint prediction and alpha_sigma).

    The teacher runs in eval mode (its previous mode is restored). With return_trajectory the
    Solution holds the steps+1 states on the grid and, in `endpoints`, the teacher's endpoint
    prediction at grid[0..steps-1], from each step's first evaluation (no extra NFE).
    """
    grid = teacher.grid(steps, schedule)
    endpoints: list[Tensor] | None = [] if return_trajectory else None

    def record(k: int, x: Tensor, t: Tensor, v: Tensor) -> None:
        endpoints.append(v if method in DPM_METHODS else teacher.endpoint_from_velocity(x, t, v))

    kw = dict(return_trajectory=return_trajectory, progress=progress, callback=record if return_trajectory else None)
    was_training = teacher.training
    teacher.eval()
    try:
        if method in DPM_METHODS:
            sol = dpm_solver(lambda x, t: teacher.endpoint(x, t, y), teacher.prior(z, grid), grid,
                             *teacher.alpha_sigma(grid), order=DPM_METHODS[method], **kw)
        else:
            sol = solve(lambda x, t: teacher.velocity(x, t, y), teacher.prior(z, grid), grid, method=method,
                        singular_end=teacher.singular_end, **kw)
    finally:
        teacher.train(was_training)
    sol.endpoints = endpoints
    return sol

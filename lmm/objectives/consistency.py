"""Consistency distillation (Song et al. 2023) from the same teacher, written on the line x_t = (1-t) z + t x."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmm.losses.combined import LossSum
from lmm.nets.precond import LinesModel
from lmm.objectives.base import Objective, bcast, constant, line_point, loss_config, student_precond
from lmm.registry import option

SOLVERS = ("euler", "heun")


def consistency_grid(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """steps + 1 line times 0 = t_0 < ... < t_steps < 1: EDM's noise levels sigma_i (the rho-schedule from sigma_max to
    sigma_min) as t_i = 1 / (1 + sigma_i), the first put at 0 (where the one-step sampler starts; an "edm" line model
    sees sigma_max there too)."""
    if steps < 1:
        raise ValueError(f"student.consistency.steps must be >= 1, got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"consistency grid needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(steps + 1, dtype=torch.float64) / steps
    sigma = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = 1 / (1 + sigma)
    t[0] = 0.0
    return t.tolist()


class Consistency(Objective):
    """Consistency distillation on dataset batches {"x", "y" optional}: for n ~ U{0..steps-1} and z ~ N(0, I),
    x_n = (1-t_n) z + t_n x, one teacher step (`solver` on the line ODE dx/dt = (D(x, t) - x) / (1 - t), D the
    teacher's line endpoint prediction) gives x_{n+1}; L = sum_k w_k d_k(f(x_n, t_n), f_target(x_{n+1}, t_{n+1})).

    f: the student, a LinesModel (precond as in lmm.objectives.lines.Lines; every parameterisation but "none" is
    the identity at t = 1, the consistency boundary). f_target: an EMA of the student's weights with decay `ema`
    per step (0: the student itself without gradient, as in improved consistency training), checkpointed with the
    run. Grid t_n: `consistency_grid(steps, sigma_min, sigma_max, rho)`. loss / loss_options: the weighted loss
    terms of lmm.losses (the paper's choices: l2 or perceptual). Few-step sampling is the multistep consistency
    sampler (the line sampler's "restart" mode: predict, re-noise to the next grid time with fresh noise).
    """

    name = "consistency"
    required_keys = ("x",)
    source = "data"
    needs_teacher = True
    sampler = "restart"
    reads = ("loss", "consistency", "precond", "sigma_data")

    @dataclass(frozen=True)
    class Options:
        steps: int = option(18, min=1)
        ema: float = option(0.95, min=0.0)
        solver: str = option("heun", choices=SOLVERS)

    def __init__(self, loss: dict[str, float] | None = None, loss_options: dict[str, dict] | None = None,
                 steps: int = Options.steps, ema: float = Options.ema, solver: str = Options.solver,
                 sigma_min: float = 0.002,
                 grid_sigma_max: float = 80.0, rho: float = 7.0, precond: str = "lines", sigma_data: float = 0.5,
                 sigma_max: float = 80.0, denoiser: str = "edm") -> None:
        super().__init__()
        if not 0 <= ema < 1:
            raise ValueError(f"student.consistency.ema must be in [0, 1), got {ema}")
        if solver not in SOLVERS:
            raise ValueError(f"student.consistency.solver: unknown {solver!r}; valid: {', '.join(SOLVERS)}")
        self.terms = LossSum(loss or {"l2": 1.0}, loss_options)
        self.loss, self.loss_options = self.terms.weights, self.terms.options
        self.steps, self.ema, self.solver = int(steps), float(ema), solver
        self.sigma_min, self.grid_sigma_max, self.rho = float(sigma_min), float(grid_sigma_max), float(rho)
        self.grid = tuple(consistency_grid(self.steps, self.sigma_min, self.grid_sigma_max, self.rho))
        self.precond, self.sigma_data, self.sigma_max, self.denoiser = precond, float(sigma_data), float(sigma_max), denoiser
        self.teacher: nn.Module | None = None
        self.target: nn.Module | None = None

    @classmethod
    def from_config(cls, scfg: dict, tcfg: dict | None) -> Consistency:
        if tcfg is None:
            raise ValueError("consistency distillation needs a teacher")
        c = scfg["consistency"]
        return cls(**loss_config(scfg), steps=c["steps"], ema=c["ema"], solver=c["solver"],
                   sigma_min=tcfg["sigma_min"], grid_sigma_max=tcfg["sigma_max"], rho=tcfg["rho"],
                   **student_precond(scfg["precond"], scfg["sigma_data"], tcfg))

    def build_model(self, net: nn.Module) -> nn.Module:
        return LinesModel(net, self.sigma_data, self.precond, self.sigma_max, self.denoiser)

    def setup(self, data_shape: tuple[int, ...], num_classes: int, *, reals: Any = None, teacher: Any = None,
              model: nn.Module | None = None) -> None:
        if teacher is None or model is None:
            raise ValueError("consistency distillation needs its teacher and the (initialised) student in setup")
        self.terms.setup(data_shape, num_classes, reals)
        self.teacher = teacher.requires_grad_(False).eval()
        self.target = copy.deepcopy(model).requires_grad_(False).eval()

    def phases(self) -> list:
        return self.terms.phases()

    def networks(self) -> list[nn.Module]:
        if self.teacher is None or self.target is None:
            raise RuntimeError("Consistency.setup() must run before its networks are taken")
        return [*self.terms.networks(), self.teacher.model, self.target]

    def train_state(self) -> dict[str, Tensor]:
        return {} if self.target is None else self.target.state_dict()

    def load_train_state(self, state: dict[str, Tensor]) -> None:
        if self.target is None:
            raise RuntimeError("Consistency.setup() must run before its training state is loaded")
        self.target.load_state_dict(state)

    @torch.no_grad()
    def update_target(self, model: nn.Module) -> None:
        """target <- ema * target + (1 - ema) * model (buffers copied)."""
        for p_t, p in zip(self.target.parameters(), model.parameters()):
            p_t.lerp_(p.detach(), 1 - self.ema)
        for b_t, b in zip(self.target.buffers(), model.buffers()):
            b_t.copy_(b)

    @torch.no_grad()
    def teacher_step(self, x: Tensor, t: Tensor, t_next: Tensor, y: Tensor | None) -> Tensor:
        """One `solver` step of the teacher's line ODE from times t to t_next, all (B,); x (B, ...)."""
        def velocity(x_: Tensor, t_: Tensor) -> Tensor:
            return (self.teacher.line_endpoint(x_, t_, y).to(x_.dtype) - x_) / bcast(1 - t_, x_)

        h = bcast(t_next - t, x)
        v = velocity(x, t)
        x_next = x + h * v
        if self.solver == "heun":
            x_next = x + h * 0.5 * (v + velocity(x_next, t_next))
        return x_next

    def forward(self, model: nn.Module, batch: dict[str, Tensor], step: int = 0) -> Tensor:
        self._check_batch(batch)
        if self.teacher is None or self.target is None:
            raise RuntimeError("Consistency.setup() must run before the loss is used")
        self.update_target(model)
        x, y = batch["x"], batch.get("y")
        grid = constant(self.grid, x.dtype, x.device)
        n = torch.randint(self.steps, (x.shape[0],), device=x.device)
        t, t_next = grid[n], grid[n + 1]
        z = torch.randn_like(x)
        x_t = line_point(z, x, t)
        with torch.no_grad():
            target = self.target(self.teacher_step(x_t, t, t_next, y), t_next, y)
        pred = model(x_t, t, y)
        return self.terms(pred, target.to(pred.dtype), {"t": t, "y": y, "step": step})

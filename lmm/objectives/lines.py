"""The lines objective: predict the teacher's endpoint x1 from any point on the line z -> x1."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmm.losses.combined import LossSum
from lmm.nets.precond import LinesModel, check_precond, lines_coefficients
from lmm.objectives.base import Objective, constant, line_point, loss_config, sample_times, student_precond

TIME_SAMPLINGS = ("uniform", "logit_normal", "grid")
WEIGHTINGS = ("none", "balanced")
MAX_BALANCED_WEIGHT = 1e4


class Lines(Objective):
    """L = w(t) sum_k lambda_k d_k(N(x_t, t, y), x1) with x_t = (1-t) z + t x1 on pairs {"z", "x1", "y" optional}.

    loss: {term: weight} over lmm.losses.LOSSES ("l2", "pseudo_huber", "perceptual", "adversarial"); terms
    with networks load them in `setup`, and a term that trains its own network (adversarial) adds its phase.
    loss_options: {term: {option: value}} for the terms' constructors. distance: the single term of model files
    written before `loss` existed.
    precond: the student's parameterisation (lmm.nets.precond.LinesModel: "edm", "velocity", "lines", "none");
    sigma_max, sigma_data and denoiser ("edm" | "vp" | "ve") are an "edm" student's (its teacher's); sigma_data also
    sets "lines"' c_skip/c_out.
    time_sampling: "uniform" U[0, 1) | "logit_normal" sigmoid(N(logit_mean, logit_std^2)) |
    "grid" uniform over the sampler grid `grid` (e.g. (0.0,) for NFE 1, (0.0, 0.5) for NFE 2).
    weighting: "none" | "balanced", w(t) = sd^2 / c_out(t)^2 = ((1-t)^2 + t^2 sd^2) / (1-t)^2, which
    makes the loss on the raw net's output unit-weighted for every t; w(0) = 1, so for t = 0 it equals
    "none". Its mean over uniform t diverges (like (1-t)^-2), so it is capped at MAX_BALANCED_WEIGHT
    (reached near 1 - t = 0.005) instead of being normalised to mean 1.
    """

    name = "lines"
    required_keys = ("z", "x1")

    def __init__(
        self,
        loss: dict[str, float] | None = None,
        time_sampling: str = "uniform",
        grid: tuple[float, ...] | list[float] = (0.0, 0.5),
        weighting: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        sigma_data: float = 0.5,
        precond: str = "lines",
        sigma_max: float = 80.0,
        loss_options: dict[str, dict] | None = None,
        distance: str | None = None,
        denoiser: str = "edm",
    ) -> None:
        super().__init__()
        if loss is None:
            loss = {distance or "l2": 1.0}
        elif distance is not None:
            raise ValueError("lines: give loss (a {term: weight} table) or the older distance, not both")
        self.terms = LossSum(loss, loss_options)
        self.loss, self.loss_options = self.terms.weights, self.terms.options
        self.distance = None
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r} for lines; valid: {', '.join(TIME_SAMPLINGS)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r} for lines; valid: {', '.join(WEIGHTINGS)}")
        grid = tuple(float(g) for g in grid)
        if not grid or any(not 0.0 <= g < 1.0 for g in grid):
            raise ValueError(f"lines grid must be a non-empty list of times in [0, 1), got {list(grid)}")
        self.time_sampling = time_sampling
        self.grid = grid
        self.weighting = weighting
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        if isinstance(precond, bool):  # model files written before precond named a parameterisation
            precond = "lines" if precond else "none"
        check_precond(precond, denoiser)
        self.sigma_data = float(sigma_data)
        self.precond = precond
        self.sigma_max = float(sigma_max)
        self.denoiser = denoiser

    reads = ("loss", "time_sampling", "grid", "weighting", "logit_mean", "logit_std", "precond", "sigma_data", "window")

    @classmethod
    def from_config(cls, scfg: dict, tcfg: dict | None) -> Lines:
        return cls(**loss_config(scfg), time_sampling=scfg["time_sampling"], grid=tuple(scfg["grid"]),
                   weighting=scfg["weighting"], logit_mean=scfg["logit_mean"], logit_std=scfg["logit_std"],
                   **student_precond(scfg["precond"], scfg["sigma_data"], tcfg))

    def setup(self, data_shape: tuple[int, ...], num_classes: int, reals=None, **_) -> None:
        """Load the networks of the loss terms (see lmm.losses.base.LossTerm.setup)."""
        self.terms.setup(data_shape, num_classes, reals)

    def phases(self) -> list:
        return self.terms.phases()

    def networks(self) -> list[nn.Module]:
        return self.terms.networks()

    def build_model(self, net: nn.Module) -> nn.Module:
        return LinesModel(net, sigma_data=self.sigma_data, precond=self.precond, sigma_max=self.sigma_max,
                          denoiser=self.denoiser)

    def sample_t(self, n: int, like: Tensor) -> Tensor:
        """(n,) line times with like's dtype/device."""
        if self.time_sampling == "grid":
            idx = torch.randint(len(self.grid), (n,), device=like.device)
            return constant(self.grid, like.dtype, like.device)[idx]
        return sample_times(n, self.time_sampling, self.logit_mean, self.logit_std, like)

    def weight(self, t: Tensor) -> Tensor:
        """w(t), shaped like t."""
        if self.weighting == "none":
            return torch.ones_like(t)
        _, c_out, _ = lines_coefficients(t, self.sigma_data)
        return (self.sigma_data**2 / c_out.square()).clamp(max=MAX_BALANCED_WEIGHT)

    def forward(self, model: nn.Module, batch: dict[str, Tensor], step: int = 0) -> Tensor:
        self._check_batch(batch)
        z, x1 = batch["z"], batch["x1"]
        if z.shape != x1.shape:
            raise ValueError(f"lines batch: z has shape {tuple(z.shape)} but x1 has {tuple(x1.shape)}")
        t = self.sample_t(x1.shape[0], x1)
        x_t = line_point(z, x1, t)
        pred = model(x_t, t, batch.get("y"))
        loss = self.terms(pred, x1, {"t": t, "y": batch.get("y"), "step": step})
        return loss * self.weight(t) if self.weighting == "balanced" else loss

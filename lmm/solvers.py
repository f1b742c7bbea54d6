"""Fixed-grid ODE solvers with exact NFE counting: Runge-Kutta (Euler, Heun, midpoint, RK4) and the
multistep DPM-Solver++(2M) and (3M) (Lu et al. 2022).

The Runge-Kutta solvers are generic over any f(x, t) -> dx/dt, where x is a tensor (B, ...) and t a
0-dim tensor taken from (or between points of) the grid. The grid may increase (flow time) or decrease
(EDM sigma). DPM-Solver++ works on a data prediction and the path's (alpha, sigma) instead. They do not
disable autograd; samplers built on them do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lmm.progress import progress_bar

VectorField = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor, Tensor, Tensor], None]
RK_METHODS = ("euler", "heun", "midpoint", "rk4")
DPM_METHODS = {"dpm++2m": 2, "dpm++3m": 3}
METHODS = (*RK_METHODS, *DPM_METHODS)
_STAGES = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4, "dpm++2m": 1, "dpm++3m": 1}
_EVALUATES_AT_END = ("heun", "rk4")


@dataclass
class Solution:
    """Result of a sampler.

    x: final state (B, ...); nfe: network/f evaluations per batch; trajectory: states at every
    grid point (first is the initial state, last is x) or None; endpoints: the model's data-end
    predictions made along the way (one per step) or None.
    """

    x: Tensor
    nfe: int
    trajectory: list[Tensor] | None = None
    endpoints: list[Tensor] | None = None


def _check_method(method: str) -> None:
    if method not in _STAGES:
        raise ValueError(f"unknown solver method {method!r}; valid: {', '.join(METHODS)}")


def expected_nfe(method: str, steps: int, singular_end: bool = False) -> int:
    """NFE that `solve` spends on `steps` intervals (without running it)."""
    _check_method(method)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    nfe = _STAGES[method] * steps
    if singular_end and method in _EVALUATES_AT_END:
        nfe -= _STAGES[method] - 1
    return nfe


def steps_within(method: str, nfe: int, singular_end: bool = False) -> int:
    """The most steps of `method` whose NFE (`expected_nfe`) is at most `nfe` (0 if none fits)."""
    steps = 0
    while expected_nfe(method, steps + 1, singular_end) <= nfe:
        steps += 1
    return steps


def _check_grid(grid: Tensor) -> Tensor:
    grid = torch.as_tensor(grid, dtype=torch.float64).cpu()
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be 1-D with at least 2 points, got shape {tuple(grid.shape)}")
    diffs = grid[1:] - grid[:-1]
    if not (bool((diffs > 0).all()) or bool((diffs < 0).all())):
        raise ValueError(f"grid must be strictly monotone, got {grid.tolist()}")
    return grid


def solve(
    f: VectorField,
    x0: Tensor,
    grid: Tensor,
    method: str = "euler",
    singular_end: bool = False,
    return_trajectory: bool = False,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> Solution:
    """Integrate dx/dt = f(x, t) from x0 (B, ...) at grid[0] to grid[-1] over the (K+1,) grid.

    Each call to f is one NFE. singular_end: f must not be evaluated at grid[-1]; the methods that
    would (heun, rk4) take a single Euler step on the last interval (EDM's Heun with 18 steps costs
    35 NFE); euler and midpoint never evaluate there and are unchanged. callback(k, x_k, t_k, f(x_k, t_k))
    is called once per step with the step's first evaluation (no extra NFE).
    """
    _check_method(method)
    if method not in RK_METHODS:
        raise ValueError(f"solve: {method!r} is not a Runge-Kutta method ({', '.join(RK_METHODS)}); "
                         "use dpm_solver_2m")
    grid = _check_grid(grid)
    steps = grid.numel() - 1
    x = x0
    nfe = 0
    trajectory = [x0] if return_trajectory else None
    for k in progress_bar(iterable=range(steps), desc=f"{method} solver", enabled=progress, leave=False):
        t0, t1 = grid[k], grid[k + 1]
        h = float(t1 - t0)
        d = f(x, t0)
        nfe += 1
        if callback is not None:
            callback(k, x, t0, d)
        euler_only = singular_end and k == steps - 1 and method in _EVALUATES_AT_END
        if method == "euler" or euler_only:
            x = x + h * d
        elif method == "heun":
            d2 = f(x + h * d, t1)
            x = x + (0.5 * h) * (d + d2)
            nfe += 1
        elif method == "midpoint":
            d2 = f(x + (0.5 * h) * d, (t0 + t1) / 2)
            x = x + h * d2
            nfe += 1
        else:
            tm = (t0 + t1) / 2
            d2 = f(x + (0.5 * h) * d, tm)
            d3 = f(x + (0.5 * h) * d2, tm)
            d4 = f(x + h * d3, t1)
            x = x + (h / 6) * (d + 2 * d2 + 2 * d3 + d4)
            nfe += 3
        if trajectory is not None:
            trajectory.append(x)
    return Solution(x=x, nfe=nfe, trajectory=trajectory)


def _log_snr(alpha: float, sigma: float) -> float:
    if sigma == 0:
        return math.inf
    return math.log(alpha / sigma) if alpha > 0 else -math.inf


def dpm_solver(
    denoise: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    grid: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    order: int = 2,
    return_trajectory: bool = False,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> Solution:
    """DPM-Solver++(2M) / (3M): multistep solver of the probability-flow ODE of x_t = alpha_t x1 + sigma_t z.

    denoise(x, t) -> x1 prediction (B, ...) at grid time t (0-dim); grid (K+1,) from noise to data, with
    alpha, sigma (K+1,) the path's coefficients there (sigma[-1] = 0). With lambda = log(alpha / sigma),
    h = lambda_{k+1} - lambda_k, phi1 = expm1(-h) and D_k = denoise(x_k, t_k):
    x_{k+1} = (sigma_{k+1} / sigma_k) x_k - alpha_{k+1} phi1 D_k + (higher-order terms from the previous D), where
    order 2 adds -alpha_{k+1} phi1 / 2 * D1 with D1 = (D_k - D_{k-1}) / r0, r0 = h_{k-1} / h (Lu et al. 2022;
    diffusers' "midpoint" 2M), and order 3 uses D_{k-2} too: with r1 = h_{k-2} / h, D1_0 = (D_k - D_{k-1}) / r0,
    D1_1 = (D_{k-1} - D_{k-2}) / r1, D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1):
    x_{k+1} = (sigma_{k+1} / sigma_k) x_k - alpha_{k+1} (phi1 D_k - phi2 D1 + phi3 D2), phi2 = phi1 / h + 1,
    phi3 = phi2 / h - 1/2. The first steps use the history they have (first, then second order); the last step
    (sigma = 0) is x_K = alpha_K D_K-1 (first order, as DPM-Solver++ and k-diffusion do). NFE = K. alpha_0 = 0 (a
    flow path starting from pure noise) is allowed. callback(k, x_k, t_k, D_k) as in `solve`.
    """
    if order not in (2, 3):
        raise ValueError(f"dpm_solver: order must be 2 or 3, got {order!r}")
    grid = _check_grid(grid)
    alpha = torch.as_tensor(alpha, dtype=torch.float64).flatten().tolist()
    sigma = torch.as_tensor(sigma, dtype=torch.float64).flatten().tolist()
    steps = grid.numel() - 1
    if len(alpha) != steps + 1 or len(sigma) != steps + 1 or sigma[-1] != 0 or min(sigma[:-1]) <= 0:
        raise ValueError("dpm_solver: alpha and sigma need one value per grid point, sigma > 0 but the last = 0")
    lam = [_log_snr(a, s) for a, s in zip(alpha, sigma)]
    x, history, hs = x0, [], []
    trajectory = [x0] if return_trajectory else None
    for k in progress_bar(iterable=range(steps), desc=f"dpm++{order}m solver", enabled=progress, leave=False):
        d = denoise(x, grid[k])
        if callback is not None:
            callback(k, x, grid[k], d)
        if sigma[k + 1] == 0:
            x = alpha[k + 1] * d
        else:
            h = lam[k + 1] - lam[k]
            phi1 = math.expm1(-h)
            x = (sigma[k + 1] / sigma[k]) * x - (alpha[k + 1] * phi1) * d
            if history and (order == 2 or len(history) == 1):
                d1 = (d - history[-1]) / (hs[-1] / h)
                x = x - (0.5 * alpha[k + 1] * phi1) * d1
            elif history:
                r0, r1 = hs[-1] / h, hs[-2] / h
                d1_0, d1_1 = (d - history[-1]) / r0, (history[-1] - history[-2]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = phi1 / h + 1
                x = x + (alpha[k + 1] * phi2) * d1 - (alpha[k + 1] * (phi2 / h - 0.5)) * d2
            hs = (hs + [h])[-2:]
        history = (history + [d])[-2:]
        if trajectory is not None:
            trajectory.append(x)
    return Solution(x=x, nfe=steps, trajectory=trajectory)

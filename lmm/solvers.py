"""Fixed-grid ODE solvers (Euler, Heun, midpoint, RK4) with exact NFE counting.

The solvers are generic over any f(x, t) -> dx/dt, where x is a tensor (B, ...) and t a 0-dim
tensor taken from (or between points of) the grid. The grid may increase (flow time) or decrease
(EDM sigma). They do not disable autograd; samplers built on them do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

VectorField = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor, Tensor, Tensor], None]
METHODS = ("euler", "heun", "midpoint", "rk4")
_STAGES = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4}
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
    grid = _check_grid(grid)
    steps = grid.numel() - 1
    x = x0
    nfe = 0
    trajectory = [x0] if return_trajectory else None
    for k in tqdm(range(steps), disable=not progress, desc=f"{method} solver", leave=False):
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

"""Few-step samplers for line students: x1_hat = N(x_t, t, y) at each grid time."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmm.compiled import compile_network, pad_rows
from lmm.dist import resolve_compile
from lmm.solvers import Solution

MODES = ("line", "restart")


def default_grid(nfe: int) -> list[float]:
    """Sampler grid for `nfe` steps: [0] for 1, [0, 0.5] for 2, [0, 1/nfe, ..., (nfe-1)/nfe] otherwise."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if nfe == 2:
        return [0.0, 0.5]
    return [k / nfe for k in range(nfe)]


def grid_for(nfe: int, trained: list[float] | tuple[float, ...] = ()) -> list[float]:
    """The grid to sample a student at `nfe` steps: the grid it was trained on when that has `nfe` times, else
    `default_grid(nfe)`."""
    return [float(t) for t in trained] if len(trained) == nfe else default_grid(nfe)


def check_grid(grid: list[float] | tuple[float, ...] | Tensor) -> list[float]:
    """Validate 0 = t_0 < t_1 < ... < t_{K-1} < 1 and return it as floats."""
    ts = [float(t) for t in (grid.tolist() if isinstance(grid, Tensor) else grid)]
    if not ts or ts[0] != 0.0 or ts[-1] >= 1.0 or any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"line sampler grid must satisfy 0 = t_0 < ... < t_(K-1) < 1, got {ts}")
    return ts


@torch.no_grad()
def sample_lines(
    model: nn.Module,
    z: Tensor,
    grid: list[float] | tuple[float, ...] | Tensor,
    y: Tensor | None = None,
    mode: str = "line",
    return_trajectory: bool = False,
    generator: torch.Generator | None = None,
    compile: bool | str = False,
    batch_size: int | None = None,
) -> Solution:
    """Sample from an endpoint predictor model(x_t, t (B,), y) -> x1_hat, starting at noise z (B, ...), with y
    (B,) int64 labels or None; grid: the K times 0 = t_0 < ... < t_{K-1} < 1 (`check_grid`), NFE = K.

    line: x_{k+1} = x_k + (t_{k+1} - t_k) (x1_hat - x_k) / (1 - t_k). restart: x_{k+1} = (1 - t_{k+1}) z' + t_{k+1} x1_hat
    with fresh z' ~ N(0, I) drawn from `generator` on its own device, then moved to z's (the global RNG of z's
    device if None). Returns a Solution: x = the last x1_hat (B, ...), nfe = K.
    With return_trajectory: trajectory = states at t_0..t_{K-1} then the output (time 1); endpoints = the K
    predictions. The model runs in eval mode (its previous mode is restored).
    compile (run.compile: true, false (default), or "auto" = on for a CUDA z): the model's network runs compiled
    (lmm.compiled.compile_network) at batch_size rows (default: z's), x_t and y padded with zero rows and the
    padding's predictions dropped, so a sampling run's short last batch needs no graph of its own.
    """
    if mode not in MODES:
        raise ValueError(f"unknown line sampler mode {mode!r}; valid: {', '.join(MODES)}")
    ts = check_grid(grid)
    trajectory = [z] if return_trajectory else None
    endpoints: list[Tensor] | None = [] if return_trajectory else None
    b = z.shape[0]
    n = b
    if resolve_compile(compile, z.device):
        compile_network(model)
        n = max(b, batch_size or b)
    y_n = pad_rows(y, n)
    was_training = model.training
    model.eval()
    try:
        x = z
        for k, t in enumerate(ts):
            x1_hat = model(pad_rows(x, n), torch.full((n,), t, dtype=torch.float32, device=z.device), y_n)
            x1_hat = x1_hat[:b] if n > b else x1_hat
            if endpoints is not None:
                endpoints.append(x1_hat)
            if k + 1 == len(ts):
                break
            t_next = ts[k + 1]
            if mode == "line":
                x = x + ((t_next - t) / (1 - t)) * (x1_hat - x)
            else:
                noise = torch.randn(z.shape, generator=generator, dtype=z.dtype,
                                    device=z.device if generator is None else generator.device).to(z.device)
                x = (1 - t_next) * noise + t_next * x1_hat
            if trajectory is not None:
                trajectory.append(x)
    finally:
        model.train(was_training)
    if trajectory is not None:
        trajectory.append(x1_hat)
    return Solution(x=x1_hat, nfe=len(ts), trajectory=trajectory, endpoints=endpoints)

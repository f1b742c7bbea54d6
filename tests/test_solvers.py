"""Solvers (order, NFE) and teachers (grids, analytic ODEs)."""
import math

import pytest
import torch
from torch import nn

from lmm.nets.precond import EDMDenoiser, VelocityModel, edm_coefficients
from lmm.solvers import RK_METHODS, dpm_solver, expected_nfe, solve
from lmm.teachers import (
    TEACHERS,
    EDMTeacher,
    FlowTeacher,
    build_teacher,
    sample_teacher,
)

ORDERS = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4}
X0 = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)


def _f(x, t):
    """dx/dt = cos(t) x: solution x(t) = x(t0) exp(sin t - sin t0) (time-dependent, so stage times matter)."""
    return torch.cos(t) * x


def _error(method, steps, t0, t1):
    grid = torch.linspace(t0, t1, steps + 1, dtype=torch.float64)
    sol = solve(_f, X0, grid, method)
    exact = X0 * math.exp(math.sin(t1) - math.sin(t0))
    return (sol.x - exact).abs().max().item()


@pytest.mark.parametrize("method", RK_METHODS)
@pytest.mark.parametrize("direction", [(0.0, 2.0), (2.0, 0.0)])
def test_convergence_order(method, direction):
    e1, e2 = _error(method, 20, *direction), _error(method, 40, *direction)
    assert math.log2(e1 / e2) == pytest.approx(ORDERS[method], abs=0.25)


@pytest.mark.parametrize("method", RK_METHODS)
@pytest.mark.parametrize("singular_end", [False, True])
def test_nfe_counts_are_exact(method, singular_end):
    steps = 7
    grid = torch.linspace(3.0, 0.0, steps + 1, dtype=torch.float64)
    calls = []

    def f(x, t):
        calls.append(float(t))
        return -x

    sol = solve(f, X0, grid, method, singular_end=singular_end, return_trajectory=True)
    per_step = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4}[method]
    want = per_step * steps
    if singular_end and method in ("heun", "rk4"):
        want -= per_step - 1
    assert sol.nfe == len(calls) == want == expected_nfe(method, steps, singular_end)
    assert len(sol.trajectory) == steps + 1 and sol.trajectory[-1] is sol.x
    if singular_end:
        assert 0.0 not in calls


def test_heun_singular_end_is_euler_last_step():
    grid = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    heun = solve(_f, X0, grid, "heun", singular_end=True)
    first = solve(_f, X0, grid[:2], "heun")
    last = solve(_f, first.x, grid[1:], "euler")
    assert heun.nfe == 3
    torch.testing.assert_close(heun.x, last.x, rtol=0, atol=0)


def test_solver_rejects_bad_input():
    with pytest.raises(ValueError, match="rk5"):
        solve(_f, X0, torch.linspace(0, 1, 3), "rk5")
    with pytest.raises(ValueError, match="monotone"):
        solve(_f, X0, torch.tensor([0.0, 0.5, 0.5, 1.0]), "euler")


def test_edm_grid():
    teacher = EDMTeacher(nn.Identity())
    g = teacher.grid(18)
    assert g.dtype == torch.float64 and g.shape == (19,)
    assert g[0].item() == pytest.approx(80.0) and g[-2].item() == pytest.approx(0.002) and g[-1].item() == 0.0
    assert bool((g[1:] < g[:-1]).all())
    i = torch.arange(18, dtype=torch.float64)
    ref = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(g[:-1], ref)
    assert teacher.grid(1).tolist() == [80.0, 0.0]
    assert expected_nfe("heun", 18, singular_end=teacher.singular_end) == 35


def test_edm_trimmed_grid_spends_no_call_at_sigma_min():
    teacher = EDMTeacher(nn.Identity())
    g = teacher.grid(2, "trimmed")
    ref = ((80 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)
    assert g.tolist() == pytest.approx([80.0, ref, 0.0]) and ref > 1.0
    assert teacher.grid(2, "edm").tolist() == pytest.approx([80.0, 0.002, 0.0])
    g = teacher.grid(18, "trimmed")
    full = (80 ** (1 / 7) + torch.arange(19, dtype=torch.float64) / 18 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(g[:-1], full[:-1])
    assert g[-1].item() == 0.0 and g[-2].item() > 0.002
    assert teacher.grid(1, "trimmed").tolist() == [80.0, 0.0]
    with pytest.raises(ValueError, match="schedule 'karras'"):
        teacher.grid(3, "karras")
    with pytest.raises(ValueError, match="integer >= 1, got 0"):
        teacher.grid(0)


def test_flow_grid():
    g = FlowTeacher(nn.Identity()).grid(4)
    assert g.dtype == torch.float64 and g.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    q = FlowTeacher(nn.Identity(), spacing="quadratic").grid(4)
    assert q[0].item() == 0.0 and q[-1].item() == 1.0 and bool((q[1:] > q[:-1]).all())
    assert (q[-1] - q[-2]) < (q[1] - q[0])


def test_build_teacher():
    assert isinstance(build_teacher("edm", nn.Identity(), sigma_max=10.0), EDMTeacher)
    assert TEACHERS["flow"].objective == "flow_matching" and TEACHERS["edm"].objective == "edm"
    with pytest.raises(ValueError, match="valid: flow, edm"):
        build_teacher("ddpm", nn.Identity())
    with pytest.raises(ValueError, match="sigma_max"):
        build_teacher("flow", nn.Identity(), sigma_max=1.0)


MU = torch.tensor([1.5, -2.0, 0.5])
S = 0.3


class StraightField(nn.Module):
    """Raw net of the exact straight flow N(0, I) -> N(MU, S^2 I), x1 = MU + S z:
    x_t = (1 + (S-1) t) z + t MU, so v(x, t) = x1 - z = (MU + (S-1) x) / (1 + (S-1) t)."""

    def forward(self, x, noise_label, class_labels=None):
        t = (noise_label / 1000).reshape(-1, 1)
        return (MU + (S - 1) * x) / (1 + (S - 1) * t)


class CurvedField(nn.Module):
    """Raw net of the independent-coupling flow N(0, I) -> N(MU, S^2 I): x_t = t MU + sig(t) z with
    sig(t)^2 = (1-t)^2 + t^2 S^2, so v = MU + sig'/sig (x - t MU) with sig' sig = t S^2 - (1-t); x1 = MU + S z."""

    def forward(self, x, noise_label, class_labels=None):
        t = (noise_label / 1000).reshape(-1, 1)
        var = (1 - t) ** 2 + t**2 * S**2
        return MU + (t * S**2 - (1 - t)) / var * (x - t * MU)


@pytest.mark.parametrize("method", ["euler", "rk4", "dpm++2m"])
def test_flow_teacher_straight_gaussian(method):
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    sol = sample_teacher(FlowTeacher(VelocityModel(StraightField())), z, 5, method, return_trajectory=True)
    torch.testing.assert_close(sol.x, MU + S * z, atol=1e-5, rtol=0)
    assert len(sol.trajectory) == 6 and len(sol.endpoints) == 5
    for x1_hat in sol.endpoints:
        torch.testing.assert_close(x1_hat, MU + S * z, atol=1e-5, rtol=0)


def test_flow_teacher_curved_gaussian_rk4():
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    teacher = FlowTeacher(VelocityModel(CurvedField()))
    coarse = (sample_teacher(teacher, z, 4, "euler").x - (MU + S * z)).abs().max()
    sol = sample_teacher(teacher, z, 20, "rk4")
    assert sol.nfe == 80
    assert coarse > 1e-2
    torch.testing.assert_close(sol.x, MU + S * z, atol=1e-4, rtol=0)


class GaussianDenoiserNet(nn.Module):
    """Raw net whose EDM-preconditioned output is the exact denoiser of N(MU, S^2 I):
    D(x; sigma) = MU + S^2 / (S^2 + sigma^2) (x - MU)."""

    def forward(self, x_in, noise_label, class_labels=None):
        sigma = (4 * noise_label).exp()
        c_skip, c_out, c_in, _ = (c.reshape(-1, 1) for c in edm_coefficients(sigma))
        x = x_in / c_in
        d = MU + S**2 / (S**2 + sigma.reshape(-1, 1) ** 2) * (x - MU)
        return (d - c_skip * x) / c_out


def test_edm_teacher_gaussian_heun():
    """dx/dsigma = (x - D)/sigma gives x(0) = MU + (sigma_max z - MU) S / sqrt(S^2 + sigma_max^2)."""
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(2))
    teacher = EDMTeacher(EDMDenoiser(GaussianDenoiserNet()))
    exact = MU + (80 * z - MU) * S / math.sqrt(S**2 + 80**2)
    sol = sample_teacher(teacher, z, 18, "heun", return_trajectory=True)
    assert sol.nfe == 35 and len(sol.trajectory) == 19 and len(sol.endpoints) == 18
    torch.testing.assert_close(sol.trajectory[0], 80 * z)
    err18 = (sol.x - exact).abs().max()
    err36 = (sample_teacher(teacher, z, 36, "heun").x - exact).abs().max()
    assert err18 < 0.1 and err36 < err18 / 3
    torch.testing.assert_close(sample_teacher(teacher, z, 36, "rk4").x, exact, atol=2e-4, rtol=0)
    for k in (0, 9, 17):
        sigma = teacher.grid(18)[k]
        torch.testing.assert_close(sol.endpoints[k], teacher.endpoint(sol.trajectory[k], sigma), atol=1e-4, rtol=1e-4)


def _gaussian_error(method: str, steps: int, schedule: str, z: torch.Tensor) -> float:
    """Max error of the EDM teacher's sample against the exact ODE solution for data N(MU, S^2 I)."""
    teacher = EDMTeacher(EDMDenoiser(GaussianDenoiserNet()))
    exact = MU + (80 * z - MU) * S / math.sqrt(S**2 + 80**2)
    return (sample_teacher(teacher, z.double(), steps, method, schedule=schedule).x - exact).abs().max().item()


def test_few_step_teacher_rows_on_the_gaussian_case():
    """The known answer: exact probability-flow ODE of a Gaussian. On EDM's own grid Euler's second call is spent
    at sigma_min, so 2 steps are no better than 1; the trimmed grid makes it count, and DPM-Solver++(2M) beats
    Euler at equal NFE and converges at second order."""
    z = torch.randn(256, 3, generator=torch.Generator().manual_seed(3))
    one = _gaussian_error("euler", 1, "edm", z)
    assert _gaussian_error("euler", 2, "edm", z) == pytest.approx(one, rel=0.01)
    assert _gaussian_error("euler", 2, "trimmed", z) < 0.9 * one
    # two steps of DPM-Solver++(2M) are two first-order steps: Euler on the same grid
    assert _gaussian_error("dpm++2m", 2, "trimmed", z) == pytest.approx(_gaussian_error("euler", 2, "trimmed", z))
    for steps in (3, 4, 8, 16, 32):
        assert _gaussian_error("dpm++2m", steps, "trimmed", z) < _gaussian_error("euler", steps, "trimmed", z)
    e32, e64 = _gaussian_error("dpm++2m", 32, "trimmed", z), _gaussian_error("dpm++2m", 64, "trimmed", z)
    assert math.log2(e32 / e64) > 1.8 and e64 < 0.01
    assert _gaussian_error("heun", 32, "trimmed", z) < 0.5 * _gaussian_error("euler", 32, "trimmed", z)


def test_dpm_solver_3m_is_third_order_on_the_gaussian_case():
    """DPM-Solver++(3M) beats (2M) at equal NFE from 16 steps on, and at 24 steps beats (2M) at 64: its higher
    order shows once the grid is fine enough (at 8-12 steps on this case it does not)."""
    z = torch.randn(256, 3, generator=torch.Generator().manual_seed(4))
    for steps in (16, 24, 32, 64):
        assert _gaussian_error("dpm++3m", steps, "trimmed", z) < _gaussian_error("dpm++2m", steps, "trimmed", z)
    assert _gaussian_error("dpm++3m", 24, "trimmed", z) < 0.5 * _gaussian_error("dpm++2m", 64, "trimmed", z)
    assert _gaussian_error("dpm++3m", 2, "trimmed", z) == pytest.approx(_gaussian_error("dpm++2m", 2, "trimmed", z))


def test_dpm_solver_nfe_and_input_checks():
    calls = []

    def denoise(x, t):
        calls.append(float(t))
        return torch.zeros_like(x)

    grid = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    sol = dpm_solver(denoise, X0, grid, torch.ones(4), grid, return_trajectory=True)
    assert sol.nfe == len(calls) == 3 == expected_nfe("dpm++2m", 3, singular_end=True) and 0.0 not in calls
    assert len(sol.trajectory) == 4 and torch.equal(sol.x, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="last = 0"):
        dpm_solver(denoise, X0, grid, torch.ones(4), grid + 1)
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        dpm_solver(denoise, X0, grid, torch.ones(4), grid, order=1)
    with pytest.raises(ValueError, match="Runge-Kutta"):
        solve(_f, X0, grid, "dpm++2m")

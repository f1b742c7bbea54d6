"""Preconditioning wrappers: they turn a raw network F(x, noise_label, class_labels) into a model.

Every wrapper holds `.net` (the raw F) and exposes `.data_shape` / `.num_classes` of that net
(None / 0 when the net does not define them).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lmm.registry import Registry


def batch_times(t: Tensor | float, x: Tensor) -> Tensor:
    """A scalar or (B,) time as a float32 (B,) tensor on x's device."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"time has shape {tuple(t.shape)}; expected a scalar or ({x.shape[0]},)")
    return t


def bcast(c: Tensor, x: Tensor) -> Tensor:
    """(B,) coefficient reshaped to broadcast against x (B, ...)."""
    return c.reshape(-1, *([1] * (x.ndim - 1)))


def lines_coefficients(t: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) of the line path x_t = (1-t) z + t x1, each shaped like t.

    var(t) = (1-t)^2 + t^2 sd^2, c_skip = t sd^2 / var, c_out = sd (1-t) / sqrt(var), c_in = 1 / sqrt(var).
    """
    sd2 = sigma_data**2
    var = (1 - t) ** 2 + t**2 * sd2
    return t * sd2 / var, sigma_data * (1 - t) / var.sqrt(), var.rsqrt()


VP_BETA_D, VP_BETA_MIN, VP_M = 19.9, 0.1, 1000
Coefficients = tuple[Tensor, Tensor, Tensor, Tensor]


class Denoiser:
    """A preconditioning of EDM's denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022,
    table 1): `coefficients(sigma (B,), sigma_data)` -> (c_skip, c_out, c_in, c_noise), each shaped like sigma.
    Logarithms are floored at sigma = 1e-20 so that sigma = 0 (c_out = 0) stays finite."""

    name: ClassVar[str]

    @staticmethod
    def coefficients(sigma: Tensor, sigma_data: float) -> Coefficients:
        raise NotImplementedError


class EDMPreconditioning(Denoiser):
    """c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
    c_noise = ln(sigma) / 4."""

    @staticmethod
    def coefficients(sigma: Tensor, sigma_data: float) -> Coefficients:
        sd2 = sigma_data**2
        var = sigma**2 + sd2
        return sd2 / var, sigma * sigma_data / var.sqrt(), var.rsqrt(), sigma.clamp_min(1e-20).log() / 4


class VPPreconditioning(Denoiser):
    """1, -sigma, 1 / sqrt(sigma^2 + 1), (M - 1) t(sigma) with VP's t(sigma) (beta_d 19.9, beta_min 0.1, M 1000)."""

    @staticmethod
    def coefficients(sigma: Tensor, sigma_data: float) -> Coefficients:
        t = ((VP_BETA_MIN**2 + 2 * VP_BETA_D * sigma.square().log1p()).sqrt() - VP_BETA_MIN) / VP_BETA_D
        return torch.ones_like(sigma), -sigma, (sigma**2 + 1).rsqrt(), (VP_M - 1) * t


class VEPreconditioning(Denoiser):
    """1, sigma, 1, ln(sigma / 2)."""

    @staticmethod
    def coefficients(sigma: Tensor, sigma_data: float) -> Coefficients:
        one = torch.ones_like(sigma)
        return one, sigma, one, (0.5 * sigma).clamp_min(1e-20).log()


DENOISERS: Registry[Denoiser] = Registry("denoiser", "teacher.denoiser")
for _name, _cls in (("edm", EDMPreconditioning), ("vp", VPPreconditioning), ("ve", VEPreconditioning)):
    DENOISERS.register(_name, _cls)


def edm_coefficients(sigma: Tensor, sigma_data: float = 0.5, denoiser: str = "edm") -> Coefficients:
    """(c_skip, c_out, c_in, c_noise) of the preconditioning `denoiser` (a DENOISERS name), each shaped like sigma."""
    return DENOISERS.get(denoiser).coefficients(sigma, sigma_data)


def edm_line_scale(t: Tensor, sigma_max: float) -> tuple[Tensor, Tensor]:
    """(scale, sigma), each shaped like t, that put the line point x_t = (1-t) z + t x1 on EDM's path:
    scale * x_t = x1' + sigma z with sigma = min((1-t)/t, sigma_max), scale = sigma / (1-t).

    For t >= 1/(1+sigma_max) this is x_t / t = x1 + ((1-t)/t) z exactly; below it sigma is clamped at
    sigma_max (at t = 0, scale * z = sigma_max z, the EDM teacher's start). At t = 1: scale 1, sigma 0.
    """
    sigma = ((1 - t) / t.clamp_min(1e-30)).clamp(max=sigma_max)
    scale = torch.where(t < 1, sigma / (1 - t).clamp_min(1e-30), torch.ones_like(t))
    return scale, sigma


def edm_denoise(net: nn.Module, x: Tensor, sigma: Tensor, sigma_data: float, y: Tensor | None = None,
                denoiser: str = "edm") -> Tensor:
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, y) of a raw net F (`edm_coefficients`); x (B, ...), sigma (B,)."""
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, sigma_data, denoiser)
    return bcast(c_skip, x) * x + bcast(c_out, x) * net(bcast(c_in, x) * x, c_noise, y)


class _Wrapper(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @property
    def data_shape(self) -> tuple[int, ...] | None:
        shape = getattr(self.net, "data_shape", None)
        return None if shape is None else tuple(shape)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes", 0) or 0)


class VelocityModel(_Wrapper):
    """Flow-matching velocity: v(x, t) = F(x, 1000 t, y); x (B, ...), t (B,) in [0, 1]."""

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x, 1000 * batch_times(t, x), y)


class EDMDenoiser(_Wrapper):
    """Denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, y) with the coefficients of `denoiser` ("edm", or
    the "vp" / "ve" preconditioning of EDM's baseline networks); x (B, ...), sigma (B,)."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, denoiser: str = "edm") -> None:
        super().__init__(net)
        check_precond(None, denoiser)
        self.sigma_data = float(sigma_data)
        self.denoiser = denoiser

    def forward(self, x: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        return edm_denoise(self.net, x, batch_times(sigma, x), self.sigma_data, y, self.denoiser)


class LineParameterisation:
    """How a LinesModel writes its raw net F as the endpoint predictor: `endpoint(model, x_t (B, ...), t (B,), y)`
    -> x1_hat (B, ...). `teacher_sigma_data`: a student with this parameterisation takes its teacher's sigma_data."""

    name: ClassVar[str]
    teacher_sigma_data: ClassVar[bool] = False

    @staticmethod
    def endpoint(model: LinesModel, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        raise NotImplementedError


class DenoiserOnLine(LineParameterisation):
    """x1_hat = D(s x_t; sigma): the denoiser D of an EDM-kind teacher (`edm_coefficients` of `model.denoiser`) at
    (s, sigma) = `edm_line_scale(t, model.sigma_max)`."""

    teacher_sigma_data = True

    @staticmethod
    def endpoint(model: LinesModel, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        scale, sigma = edm_line_scale(t, model.sigma_max)
        return edm_denoise(model.net, bcast(scale, x_t) * x_t, sigma, model.sigma_data, y, model.denoiser)


class VelocityOnLine(LineParameterisation):
    """x1_hat = x_t + (1-t) F(x_t, 1000 t, y): a flow-matching teacher's endpoint."""

    @staticmethod
    def endpoint(model: LinesModel, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return x_t + bcast(1 - t, x_t) * model.net(x_t, 1000 * t, y)


class LinesPreconditioning(LineParameterisation):
    """x1_hat = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, 1000 t, y) (`lines_coefficients` of model.sigma_data)."""

    @staticmethod
    def endpoint(model: LinesModel, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        c_skip, c_out, c_in = lines_coefficients(t, model.sigma_data)
        out = model.net(bcast(c_in, x_t) * x_t, 1000 * t, y)
        return bcast(c_skip, x_t) * x_t + bcast(c_out, x_t) * out


class RawNet(LineParameterisation):
    """x1_hat = F(x_t, 1000 t, y)."""

    @staticmethod
    def endpoint(model: LinesModel, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return model.net(x_t, 1000 * t, y)


PARAMETERISATIONS: Registry[LineParameterisation] = Registry("line parameterisation", "precond")
for _name, _cls in (("edm", DenoiserOnLine), ("velocity", VelocityOnLine), ("lines", LinesPreconditioning),
                    ("none", RawNet)):
    PARAMETERISATIONS.register(_name, _cls)


def check_precond(precond: str | None, denoiser: str) -> None:
    """Raise ValueError unless `precond` is in PARAMETERISATIONS (None: not checked) and `denoiser` in DENOISERS."""
    if precond is not None and precond not in PARAMETERISATIONS:
        raise ValueError(f"unknown student precond {precond!r}; valid: {', '.join(PARAMETERISATIONS)}")
    if denoiser not in DENOISERS:
        raise ValueError(f"unknown denoiser {denoiser!r}; valid: {', '.join(DENOISERS)}")


class LinesModel(_Wrapper):
    """Endpoint predictor x1_hat = N(x_t, t, y) on the line x_t = (1-t) z + t x1; x_t (B, ...), t (B,).

    precond: how the raw net F is wrapped, a name in PARAMETERISATIONS ("edm" and "velocity" are the teachers' own
    parameterisations, so a student that starts from a teacher's weights starts as exactly that teacher's
    endpoint predictor; "lines" derives EDM-style coefficients for the line; "none" is the raw net). All but
    "none" are exact at the data end (x1_hat = x_t at t = 1).
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, precond: str = "lines",
                 sigma_max: float = 80.0, denoiser: str = "edm") -> None:
        super().__init__(net)
        check_precond(precond, denoiser)
        self.sigma_data = float(sigma_data)
        self.precond = precond
        self.parameterisation = PARAMETERISATIONS.get(precond)
        self.sigma_max = float(sigma_max)
        self.denoiser = denoiser

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.parameterisation.endpoint(self, x_t, batch_times(t, x_t), y)

    def velocity(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Implied velocity (x1_hat - x_t) / (1 - t), (B, ...); undefined at t = 1."""
        t = batch_times(t, x_t)
        return (self(x_t, t, y) - x_t) / bcast(1 - t, x_t)


__all__ = [
    "DENOISERS",
    "PARAMETERISATIONS",
    "EDMDenoiser",
    "LinesModel",
    "VelocityModel",
    "batch_times",
    "bcast",
    "check_precond",
    "edm_coefficients",
    "edm_denoise",
    "edm_line_scale",
    "lines_coefficients",
]

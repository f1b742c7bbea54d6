"""Preconditioning, distances and objectives."""
import math

import pytest
import torch
from torch import nn

from lmm.losses import LOSSES, check_loss, l2, pseudo_huber, pseudo_huber_c
from lmm.nets.precond import EDMDenoiser, LinesModel, VelocityModel, lines_coefficients
from lmm.objectives import OBJECTIVES, EDMLoss, FlowMatching, Lines, get_objective

SHAPE = (1, 4, 4)


class TinyNet(nn.Module):
    """Raw net F(x, noise_label, class_labels) for (B, *SHAPE) data."""

    def __init__(self, num_classes: int = 0):
        super().__init__()
        dim = math.prod(SHAPE)
        self.data_shape, self.num_classes = SHAPE, num_classes
        self.inp = nn.Linear(dim + 1, 32)
        self.emb = nn.Embedding(num_classes, 32) if num_classes else None
        self.out = nn.Linear(32, dim)

    def forward(self, x, noise_label, class_labels=None):
        h = self.inp(torch.cat([x.flatten(1), noise_label.reshape(-1, 1) / 1000], 1))
        if self.emb is not None:
            h = h + self.emb(class_labels)
        return self.out(torch.tanh(h)).reshape(x.shape)


class Recorder(nn.Module):
    """Raw net that records its inputs and returns a fixed output."""

    def __init__(self, out):
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, x, noise_label, class_labels=None):
        self.calls.append((x.clone(), noise_label.clone()))
        return self.out


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_lines_precond_data_end_is_exact():
    c_skip, c_out, c_in = lines_coefficients(torch.tensor([0.0, 1.0]), 0.5)
    assert c_skip.tolist() == [0.0, 1.0] and c_out.tolist() == [0.5, 0.0] and c_in.tolist() == [1.0, 2.0]
    x_t = _rand(5, *SHAPE)
    model = LinesModel(Recorder(1e3 * _rand(5, *SHAPE, seed=1)))
    assert torch.equal(model(x_t, torch.ones(5)), x_t)
    assert model.data_shape is None and model.num_classes == 0
    assert LinesModel(TinyNet(3)).data_shape == SHAPE and LinesModel(TinyNet(3)).num_classes == 3


def test_lines_precond_formula_and_velocity():
    sd, t = 0.5, torch.tensor([0.0, 0.3, 0.9])
    x_t, out = _rand(3, *SHAPE), _rand(3, *SHAPE, seed=1)
    rec = Recorder(out)
    pred = LinesModel(rec, sigma_data=sd)(x_t, t)
    var = ((1 - t) ** 2 + t**2 * sd**2).reshape(-1, 1, 1, 1)
    tb = t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(pred, tb * sd**2 / var * x_t + sd * (1 - tb) / var.sqrt() * out)
    torch.testing.assert_close(rec.calls[0][0], x_t / var.sqrt())
    torch.testing.assert_close(rec.calls[0][1], 1000 * t)
    torch.testing.assert_close(LinesModel(rec, precond="none")(x_t, t), out)
    torch.testing.assert_close(LinesModel(rec, sigma_data=sd).velocity(x_t, t), (pred - x_t) / (1 - tb))


@pytest.mark.parametrize("precond", ["edm", "velocity", "lines"])
def test_every_parameterisation_is_exact_at_the_data_end(precond):
    x_t = _rand(4, *SHAPE)
    assert torch.equal(LinesModel(Recorder(1e3 * _rand(4, *SHAPE, seed=1)), precond=precond)(x_t, torch.ones(4)), x_t)


def test_student_with_edm_precond_is_the_teachers_denoiser_on_the_line():
    """N(x_t, t) = D(x_t / t, (1-t)/t) with the teacher's own net and preconditioning, sigma clamped at sigma_max
    (and the input then scaled so that t = 0 gives D(sigma_max z, sigma_max), the teacher's first call)."""
    torch.manual_seed(0)
    net = TinyNet(0)
    teacher = EDMDenoiser(net, sigma_data=0.5)
    student = LinesModel(net, sigma_data=0.5, precond="edm", sigma_max=80.0)
    x_t = _rand(4, *SHAPE)
    t = torch.tensor([0.05, 0.3, 0.7, 0.99])
    sigma = (1 - t) / t
    want = teacher(x_t / t.reshape(-1, 1, 1, 1), sigma)
    torch.testing.assert_close(student(x_t, t), want, atol=1e-5, rtol=1e-5)
    z = _rand(4, *SHAPE, seed=2)
    torch.testing.assert_close(student(z, torch.zeros(4)), teacher(80 * z, torch.full((4,), 80.0)), atol=1e-5, rtol=1e-5)
    t_max = torch.full((4,), 1 / 81)
    torch.testing.assert_close(student(x_t, t_max), teacher(81 * x_t, torch.full((4,), 80.0)), atol=1e-5, rtol=1e-5)


def test_student_with_velocity_precond_is_the_flow_teachers_endpoint():
    torch.manual_seed(0)
    net = TinyNet(0)
    x_t, t = _rand(3, *SHAPE), torch.tensor([0.0, 0.4, 0.9])
    want = x_t + (1 - t).reshape(-1, 1, 1, 1) * VelocityModel(net)(x_t, t)
    torch.testing.assert_close(LinesModel(net, precond="velocity")(x_t, t), want, atol=1e-6, rtol=1e-6)


def test_edm_denoiser_matches_edm_formulas():
    sd, sigma = 0.5, torch.tensor([0.002, 0.5, 80.0])
    x, out = _rand(3, *SHAPE), _rand(3, *SHAPE, seed=1)
    rec = Recorder(out)
    d = EDMDenoiser(rec, sigma_data=sd)(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (sd**2 + s**2).sqrt()
    torch.testing.assert_close(d, c_skip * x + c_out * out)
    torch.testing.assert_close(rec.calls[0][0], c_in * x)
    torch.testing.assert_close(rec.calls[0][1], sigma.log() / 4)


def test_velocity_model_time_label():
    rec = Recorder(torch.zeros(2, *SHAPE))
    VelocityModel(rec)(torch.zeros(2, *SHAPE), torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(rec.calls[0][1], torch.tensor([250.0, 1000.0]))
    with pytest.raises(ValueError, match="expected a scalar or"):
        VelocityModel(rec)(torch.zeros(2, *SHAPE), torch.zeros(3))


def test_distances_and_loss_tables():
    a, b = _rand(4, *SHAPE), _rand(4, *SHAPE, seed=1)
    torch.testing.assert_close(l2(a, b), ((a - b) ** 2).mean((1, 2, 3)))
    dim = math.prod(SHAPE)
    c = 0.00054 * math.sqrt(dim)
    assert pseudo_huber_c(dim) == c
    ctx = {"t": torch.zeros(4), "y": None, "step": 0}
    torch.testing.assert_close(LOSSES["pseudo_huber"]()(a, b, ctx), (((a - b) ** 2).sum((1, 2, 3)) + c**2).sqrt() - c)
    torch.testing.assert_close(LOSSES["l2"]()(a, b, ctx), l2(a, b))
    assert pseudo_huber(a, a, c).eq(0).all()
    assert check_loss({"l2": 1, "perceptual": 0}) == {"l2": 1.0}
    with pytest.raises(ValueError, match="unknown term.*lpips.*valid: l2, pseudo_huber"):
        check_loss({"lpips": 1.0})
    with pytest.raises(ValueError, match="every weight is 0"):
        check_loss({"l2": 0})
    with pytest.raises(ValueError, match="numbers >= 0"):
        check_loss({"l2": -1})
    # a weighted sum of terms: 2 l2 + 0.5 pseudo-Huber
    z, x1 = _rand(8, *SHAPE), _rand(8, *SHAPE, seed=1)
    pred = _rand(8, *SHAPE, seed=2)
    obj = Lines(loss={"l2": 2.0, "pseudo_huber": 0.5}, time_sampling="grid", grid=[0.0])
    loss = obj(Oracle(pred), {"z": z, "x1": x1})
    torch.testing.assert_close(loss, 2 * l2(pred, x1) + 0.5 * pseudo_huber(pred, x1, c))
    assert Lines(distance="pseudo_huber").loss == {"pseudo_huber": 1.0}  # model files written before `loss`


class Oracle(nn.Module):
    """Model (x_t, t, y) -> x1 that returns the batch's endpoints exactly and records t."""

    def __init__(self, x1):
        super().__init__()
        self.x1, self.ts = x1, []

    def forward(self, x_t, t, y=None):
        self.ts.append(t.clone())
        return self.x1


@pytest.mark.parametrize("distance", ["l2", "pseudo_huber"])
@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal", "grid"])
@pytest.mark.parametrize("weighting", ["none", "balanced"])
def test_lines_loss_zero_for_exact_endpoint(distance, time_sampling, weighting):
    torch.manual_seed(0)
    z, x1 = _rand(256, *SHAPE), _rand(256, *SHAPE, seed=1)
    obj = Lines(loss={distance: 1.0}, time_sampling=time_sampling, weighting=weighting, grid=[0.0, 0.5])
    oracle = Oracle(x1)
    loss = obj(oracle, {"z": z, "x1": x1})
    assert loss.shape == (256,) and loss.eq(0).all()
    t = oracle.ts[0]
    assert t.shape == (256,) and bool(((t >= 0) & (t <= 1)).all())
    if time_sampling == "grid":
        assert set(t.tolist()) == {0.0, 0.5}
    else:
        assert t.std() > 0.1
    assert obj(Oracle(x1 + 0.1), {"z": z, "x1": x1}).gt(0).all()


def test_lines_loss_values_and_weighting():
    torch.manual_seed(0)
    z, x1 = _rand(64, *SHAPE), _rand(64, *SHAPE, seed=1)
    obj = Lines(time_sampling="grid", grid=[0.0])
    rec = Recorder(_rand(64, *SHAPE, seed=2))
    model = obj.build_model(rec)
    loss = obj(model, {"z": z, "x1": x1})
    torch.testing.assert_close(rec.calls[0][0], z)
    torch.testing.assert_close(loss, l2(0.5 * rec.out, x1))
    balanced = Lines(weighting="balanced")
    t = torch.tensor([0.0, 0.5, 0.9, 1.0])
    w = balanced.weight(t)
    assert w[0].item() == pytest.approx(1.0) and bool((w[1:] > w[:-1]).all()) and w[-1].item() == 1e4
    torch.testing.assert_close(w[:3], ((1 - t) ** 2 + t**2 * 0.25)[:3] / (1 - t[:3]) ** 2)


def test_lines_perfect_preconditioned_net_gives_near_zero_loss():
    """F* = ((1-t) x1 - t sd^2 z) / (sd sqrt(var)) makes the preconditioned prediction exactly x1."""
    torch.manual_seed(0)
    sd = 0.5
    z, x1 = _rand(128, *SHAPE), _rand(128, *SHAPE, seed=1)

    class Perfect(nn.Module):
        def forward(self, x_in, noise_label, class_labels=None):
            t = (noise_label / 1000).reshape(-1, 1, 1, 1)
            return ((1 - t) * x1 - t * sd**2 * z) / (sd * ((1 - t) ** 2 + t**2 * sd**2).sqrt())

    obj = Lines(weighting="balanced")
    assert obj(obj.build_model(Perfect()), {"z": z, "x1": x1}).max() < 1e-9


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objectives_give_finite_losses_with_gradients(name):
    torch.manual_seed(0)
    obj = get_objective(name)
    net = TinyNet(num_classes=3)
    model = obj.build_model(net)
    y = torch.randint(0, 3, (8,))
    batch = {"z": _rand(8, *SHAPE), "x1": _rand(8, *SHAPE, seed=1), "y": y} if "z" in obj.required_keys else {"x": _rand(8, *SHAPE), "y": y}
    if obj.needs_teacher:
        teacher = obj.build_model(TinyNet(num_classes=3))
        teacher.line_endpoint = teacher.forward
        obj.setup(SHAPE, 3, teacher=teacher, model=model)
    loss = obj(model, batch)
    assert loss.shape == (8,) and torch.isfinite(loss).all() and loss.gt(0).all()
    loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.emb.weight.grad.abs().sum() > 0


def test_flow_matching_target():
    torch.manual_seed(0)
    x = _rand(512, *SHAPE)
    out = _rand(512, *SHAPE, seed=1)
    rec = Recorder(out)
    loss = FlowMatching()(VelocityModel(rec), {"x": x})
    x_t, label = rec.calls[0]
    t = (label / 1000).reshape(-1, 1, 1, 1)
    z = (x_t - t * x) / (1 - t)
    torch.testing.assert_close(loss, l2(out, x - z), atol=1e-4, rtol=1e-4)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    rec.calls.clear()
    FlowMatching(time_sampling="logit_normal", logit_mean=2.0)(VelocityModel(rec), {"x": x})
    assert rec.calls[0][1].mean() > 700


def test_edm_loss_weighting_and_sigma_distribution():
    torch.manual_seed(0)
    x = _rand(4096, *SHAPE)

    class DenoiserRecorder(nn.Module):
        def forward(self, noisy, sigma, y=None):
            self.noisy, self.sigma = noisy, sigma
            return torch.zeros_like(noisy)

    model = DenoiserRecorder()
    loss = EDMLoss()(model, {"x": x})
    s = model.sigma
    torch.testing.assert_close(loss, (s**2 + 0.25) / (s * 0.5) ** 2 * l2(torch.zeros_like(x), x))
    assert abs(s.log().mean().item() + 1.2) < 0.06 and abs(s.log().std().item() - 1.2) < 0.06
    n = (model.noisy - x) / s.reshape(-1, 1, 1, 1)
    assert abs(n.std().item() - 1) < 0.02


def test_registry_errors():
    with pytest.raises(ValueError, match="valid: flow_matching, edm, lines, reflow, ot_cfm, consistency"):
        get_objective("shortcut")
    with pytest.raises(ValueError, match="'P_mean'.*valid: loss"):
        get_objective("lines", P_mean=0.0)
    with pytest.raises(ValueError, match="valid: none, balanced"):
        get_objective("lines", weighting="snr")
    with pytest.raises(ValueError, match="lines grid"):
        get_objective("lines", time_sampling="grid", grid=[0.0, 1.0])
    with pytest.raises(ValueError, match="missing \\['z', 'x1'\\]"):
        get_objective("lines")(LinesModel(TinyNet()), {"x": _rand(2, *SHAPE)})
    assert isinstance(get_objective("edm").build_model(TinyNet()), EDMDenoiser)

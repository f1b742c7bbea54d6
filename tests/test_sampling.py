"""Few-step line sampler."""
import numpy as np
import pytest
import torch
from torch import nn

from lmm.nets.precond import LinesModel, VelocityModel
from lmm.sampling import check_grid, default_grid, sample_lines
from lmm.teachers import FlowTeacher, sample_teacher

D = 6


class TinyNet(nn.Module):
    """Raw net F(x, noise_label, class_labels) for (B, D) data."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin1, self.lin2 = nn.Linear(D + 1, 32), nn.Linear(32, D)

    def forward(self, x, noise_label, class_labels=None):
        return self.lin2(torch.tanh(self.lin1(torch.cat([x, noise_label.reshape(-1, 1) / 1000], 1))))


class LineLookup(nn.Module):
    """Perfect line-aware endpoint predictor: returns x1_i of the pair whose line passes through x_t."""

    def __init__(self, z, x1):
        super().__init__()
        self.z, self.x1 = z, x1

    def forward(self, x_t, t, y=None):
        tb = t.reshape(-1, 1, 1)
        on_line = (1 - tb) * self.z[None] + tb * self.x1[None]
        return self.x1[(x_t[:, None] - on_line).square().sum(-1).argmin(1)]


class NoiseLookup(nn.Module):
    """Perfect NFE-1 predictor: x1 of the stored pair whose z equals x_0 = z exactly."""

    def __init__(self, z, x1):
        super().__init__()
        self.z, self.x1 = z, x1

    def forward(self, x_t, t, y=None):
        assert bool((t == 0).all())
        match = (x_t[:, None] == self.z[None]).all(-1)
        assert bool((match.sum(1) == 1).all())
        return self.x1[match.float().argmax(1)]


@pytest.fixture(scope="module")
def pairs():
    z = torch.randn(32, D, generator=torch.Generator().manual_seed(0))
    teacher = FlowTeacher(VelocityModel(TinyNet()))
    x1 = sample_teacher(teacher, z, 8, "heun").x
    assert not torch.allclose(x1, z, atol=0.1)
    return z, x1


def test_nfe1_perfect_predictor_reproduces_teacher(pairs):
    z, x1 = pairs
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(1))
    sol = sample_lines(NoiseLookup(z[perm], x1[perm]), z, default_grid(1))
    assert sol.nfe == 1 and torch.equal(sol.x, x1)


@pytest.mark.parametrize("nfe", [2, 4])
def test_multistep_line_aware_predictor_reproduces_teacher(pairs, nfe):
    z, x1 = pairs
    sol = sample_lines(LineLookup(z, x1), z, default_grid(nfe), return_trajectory=True)
    assert sol.nfe == nfe and torch.equal(sol.x, x1)
    ts = default_grid(nfe) + [1.0]
    assert len(sol.trajectory) == nfe + 1 and len(sol.endpoints) == nfe
    for t, x in zip(ts, sol.trajectory):
        torch.testing.assert_close(x, (1 - t) * z + t * x1)
    assert all(torch.equal(e, x1) for e in sol.endpoints)


class Recorder(nn.Module):
    """Endpoint model that records (x_t, t) and returns fixed predictions in turn."""

    def __init__(self, outs):
        super().__init__()
        self.outs, self.calls = outs, []

    def forward(self, x_t, t, y=None):
        self.calls.append((x_t.clone(), t.clone(), y))
        return self.outs[len(self.calls) - 1]


def test_line_and_restart_updates():
    z = torch.randn(5, D)
    outs = [torch.randn(5, D) for _ in range(3)]
    y = torch.arange(5)
    rec = Recorder(outs)
    sol = sample_lines(rec, z, [0.0, 0.25, 0.6], y=y)
    assert sol.x is outs[2] and sol.nfe == 3
    x1 = z + 0.25 * (outs[0] - z)
    x2 = x1 + (0.35 / 0.75) * (outs[1] - x1)
    for (x, t, yy), want_x, want_t in zip(rec.calls, [z, x1, x2], [0.0, 0.25, 0.6]):
        torch.testing.assert_close(x, want_x)
        assert t.shape == (5,) and t.dtype == torch.float32 and bool((t == want_t).all()) and yy is y

    rec = Recorder(outs)
    sample_lines(rec, z, [0.0, 0.25, 0.6], mode="restart", generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    n1, n2 = torch.randn(z.shape, generator=g), torch.randn(z.shape, generator=g)
    torch.testing.assert_close(rec.calls[1][0], 0.75 * n1 + 0.25 * outs[0])
    torch.testing.assert_close(rec.calls[2][0], 0.4 * n2 + 0.6 * outs[1])


def test_restart_is_seeded_and_model_mode_restored():
    z = torch.randn(16, D)
    model = LinesModel(TinyNet(seed=4)).train()
    runs = [sample_lines(model, z, [0.0, 0.5], mode="restart", generator=torch.Generator().manual_seed(s)).x for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    assert model.training and not runs[0].requires_grad
    one = sample_lines(model, z, [0.0], mode="restart", generator=torch.Generator().manual_seed(9)).x
    assert torch.equal(one, sample_lines(model, z, [0.0]).x)


def test_restart_sampling_of_a_model_is_seeded_per_noise_batch(monkeypatch):
    """`lmm sample` / `lmm eval` of a restart-mode student: the fresh noise of noise batch i comes from the sampling
    seed and i alone, not from the global RNG, so reruns agree and a torchrun rank's share equals that part of a
    single process's samples."""
    from lmm import dist, generate

    net = TinyNet(seed=5)
    net.data_shape, net.num_classes = (D,), 0
    model = LinesModel(net).eval()
    kw = dict(seed=11, batch_size=4, nfe=3, mode="restart")
    torch.manual_seed(0)
    one = generate.sample(model, 8, **kw)["images"]
    torch.manual_seed(1)
    assert np.array_equal(one, generate.sample(model, 8, **kw)["images"])
    line = generate.sample(model, 8, **{**kw, "mode": "line"})["images"]
    assert not np.allclose(one, line)
    monkeypatch.setattr(dist, "shard", lambda n: range(1, 2))
    assert np.array_equal(generate.sample(model, 8, **kw)["images"], one[4:])


def test_grids():
    assert default_grid(1) == [0.0] and default_grid(2) == [0.0, 0.5] and default_grid(4) == [0.0, 0.25, 0.5, 0.75]
    assert check_grid(torch.tensor([0.0, 0.4])) == [0.0, pytest.approx(0.4)]
    for bad in ([0.1], [0.0, 1.0], [0.0, 0.5, 0.5], []):
        with pytest.raises(ValueError, match="0 = t_0"):
            check_grid(bad)
    with pytest.raises(ValueError, match="valid: line, restart"):
        sample_lines(nn.Identity(), torch.zeros(1, D), [0.0], mode="cm")

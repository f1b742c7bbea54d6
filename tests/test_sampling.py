"""Few-step line sampler, and `lmm.generate` drawing and saving samples."""
import json

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


class TinyImageNet(nn.Module):
    """Raw net F(x, noise_label, class_labels) for (B, 1, 4, 4) images of 3 classes."""

    data_shape, num_classes = (1, 4, 4), 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.lin = nn.Linear(16 + 1 + 3, 16)

    def forward(self, x, noise_label, class_labels=None):
        h = torch.cat([x.flatten(1), noise_label.reshape(-1, 1) / 1000, nn.functional.one_hot(class_labels, 3)], 1)
        return torch.tanh(self.lin(h)).view_as(x)


@pytest.mark.parametrize("mode", ["line", "restart"])
def test_seeds_give_each_image_its_own_noise_whatever_the_batch(mode, monkeypatch):
    """sample(seeds=...): the image of seed s (and its class, s % classes) comes from s alone: the same in any batch,
    on a torchrun rank's share (restart students: one seed per batch) and sampled alone; with --class every seed
    keeps its noise."""
    from lmm import dist, generate

    model = LinesModel(TinyImageNet()).eval()
    kw = dict(batch_size=3, nfe=2, mode=mode)
    many = generate.sample(model, seeds=[3, 4, 5, 9, 10], **kw)
    assert many["seeds"].tolist() == [3, 4, 5, 9, 10] and many["labels"].tolist() == [0, 1, 2, 0, 1]
    for k, s in enumerate([4, 9]):
        alone = generate.sample(model, seeds=[s], **{**kw, "batch_size": 1})
        assert np.array_equal(alone["images"][0], many["images"][[1, 3][k]])
    other = generate.sample(model, seeds=[9, 4], **{**kw, "batch_size": 2})
    assert np.array_equal(other["images"], many["images"][[3, 1]])
    classed = generate.sample(model, seeds=[4, 9], label=2, **kw)
    assert classed["labels"].tolist() == [2, 2]
    monkeypatch.setattr(dist, "shard", lambda n: range(1, 2))
    share = many["images"][3:] if mode == "line" else many["images"][1:2]
    assert np.array_equal(generate.sample(model, seeds=[3, 4, 5, 9, 10], **kw)["images"], share)
    z, _ = next(generate.seed_batches([4], 1, (1, 4, 4), 3))
    assert torch.equal(z, next(generate.noise_batches(1, 1, (1, 4, 4), 3, seed=4))[0])
    z, y = next(generate.seed_batches([4, 9], 2, (1, 4, 4), 3, label=2))
    assert torch.equal(z[1], next(generate.seed_batches([9], 1, (1, 4, 4), 3))[0][0]) and y.tolist() == [2, 2]


def test_seeds_alone_equal_one_sample_of_that_seed():
    from lmm import generate

    net = TinyNet(seed=5)
    net.data_shape, net.num_classes = (D,), 0
    model = LinesModel(net).eval()
    for mode in ("line", "restart"):
        kw = dict(nfe=3, mode=mode)
        assert np.array_equal(generate.sample(model, seeds=[7], **kw)["images"],
                              generate.sample(model, 1, seed=7, **kw)["images"])
    with pytest.raises(ValueError, match="one of n and seeds"):
        generate.sample(model, 4, seeds=[1])


def test_png_folder_holds_the_npz_images_named_by_seed(tmp_path):
    from PIL import Image

    from lmm import generate

    model = LinesModel(TinyImageNet()).eval()
    result = generate.sample(model, seeds=[0, 7, 12], nfe=1)
    generate.save_samples(result, tmp_path / "s.npz")
    folder = generate.save_png_folder(result, tmp_path / "pngs")
    names = ["000000.png", "000007.png", "000012.png"]
    assert sorted(p.name for p in folder.iterdir()) == [*names, "dataset.json"]
    stored = np.load(tmp_path / "s.npz")
    assert stored["seeds"].tolist() == [0, 7, 12] and stored["labels"].tolist() == [0, 1, 0]
    for name, image in zip(names, stored["images"]):
        assert np.array_equal(np.asarray(Image.open(folder / name))[..., None], image)
    labels = json.loads((folder / "dataset.json").read_text())
    assert labels == {"labels": [["000000.png", 0], ["000007.png", 1], ["000012.png", 0]]}
    plain = generate.save_png_folder({**result, "seeds": None, "labels": None}, tmp_path / "plain")
    assert sorted(p.name for p in plain.iterdir()) == ["000000.png", "000001.png", "000002.png"]

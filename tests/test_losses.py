"""Loss terms: the perceptual distance and the adversarial loss with its discriminator phase, in the training loop
(resume exactness, several networks, torchrun)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmm.checkpoint import load_checkpoint, load_model_file
from lmm.cli.main import main
from lmm.losses import LOSSES
from lmm.losses.adversarial import Adversarial, diff_augment
from lmm.losses.perceptual import Perceptual

pytest.importorskip("efficientnet_lite_pytorch")


def _images(n: int = 4, seed: int = 0, size: int = 28) -> torch.Tensor:
    """Smooth random grey images (B, 1, size, size) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 1, 7, 7, generator=g) * 2 - 1, size=(size, size), mode="bilinear")
    return x.clamp(-1, 1)


def _blur(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (k, k, k, k), mode="replicate"), 2 * k + 1, stride=1) if k else x


@pytest.fixture(scope="module")
def perceptual() -> Perceptual:
    term = Perceptual()
    term.setup((1, 28, 28), 0)
    return term


def test_perceptual_zero_for_identical_and_monotone_in_blur_and_noise(perceptual):
    x = _images()
    ctx = {"t": torch.zeros(4), "y": None, "step": 0}
    assert perceptual(x, x, ctx).abs().max() < 1e-6
    blurred = [perceptual(_blur(x, k), x, ctx).mean().item() for k in range(4)]
    assert all(a < b for a, b in zip(blurred, blurred[1:])), blurred
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    noisy = [perceptual((x + s * noise).clamp(-1, 1), x, ctx).mean().item() for s in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(noisy, noisy[1:])), noisy


def test_perceptual_gradients_flow_to_the_prediction_only(perceptual):
    x, pred = _images(), _images(seed=1).requires_grad_(True)
    loss = perceptual(pred, x, {"t": torch.zeros(4), "y": None, "step": 0})
    assert loss.shape == (4,)
    loss.sum().backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in perceptual.parameters())


def test_diff_augment_keeps_shape_and_gradients():
    x = _images(8).requires_grad_(True)
    torch.manual_seed(0)
    y = diff_augment(x, ("translation", "cutout", "color"))
    assert y.shape == x.shape and not torch.equal(y, x)
    y.sum().backward()
    assert x.grad.abs().sum() > 0
    torch.manual_seed(0)
    assert torch.equal(diff_augment(x, ("translation", "cutout", "color")), y)


class _Reals:
    """BatchSource of bright images (the real side) against dark fakes: separable data."""

    def batch(self, step, rank, world, batch_size):
        return {"x": _images(batch_size, seed=100 + step).abs()}


def test_discriminator_loss_falls_on_separable_data():
    term = Adversarial(augment=())
    term.setup((1, 28, 28), 0, reals=_Reals())
    (phase,) = term.phases()
    opt = torch.optim.Adam(phase.net.parameters(), lr=phase.lr, betas=phase.betas)
    losses = []
    for step in range(14):
        fake = -_images(16, seed=step).abs()
        term(fake, fake, {"t": torch.zeros(16), "y": None, "step": step})
        loss = phase.loss(phase.net, {}, step, 0, 1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert max(losses[-3:]) < 0.5 * losses[0], losses
    with pytest.raises(RuntimeError, match="no fakes from that step"):
        phase.loss(phase.net, {}, 99, 0, 1)


def test_adversarial_is_off_before_its_start_step_and_r1_adds_a_penalty():
    term = Adversarial(start=5, r1=1.0, augment=())
    term.setup((1, 28, 28), 0, reals=_Reals())
    x = _images(4)
    assert term(x, x, {"t": torch.zeros(4), "y": None, "step": 2}).eq(0).all()
    assert not term.phases()[0].due(4) and term.phases()[0].due(5)
    plain = Adversarial(start=5, r1=0.0, augment=())
    plain.setup((1, 28, 28), 0, reals=_Reals())
    plain.disc.load_state_dict(term.disc.state_dict())
    for t in (term, plain):
        t(x, x, {"t": torch.zeros(4), "y": None, "step": 6})
    assert (term.disc_loss(term.disc, {}, 6, 0, 1) > plain.disc_loss(plain.disc, {}, 6, 0, 1)).all()


def test_registry_and_options_errors():
    assert set(LOSSES) == {"l2", "pseudo_huber", "perceptual", "adversarial"}
    with pytest.raises(ValueError, match="student.perceptual.network"):
        Perceptual(network="squeeze")
    with pytest.raises(ValueError, match="student.adversarial.augment"):
        Adversarial(augment=["flip"])
    with pytest.raises(RuntimeError, match="setup"):
        Perceptual()(_images(), _images(), {"t": None, "y": None, "step": 0})


TINY = ["run.progress=false", "teacher.net.channels=8", "student.net.channels=8", "teacher.train.steps=4",
        "teacher.train.batch_size=16", "teacher.steps=3", "pairs.n=64", "pairs.shard_size=64",
        "student.train.batch_size=8", "student.train.ckpt_every=3", "student.train.log_every=1",
        "student.perceptual.resolution=32", "student.adversarial.resolution=32", "student.adversarial.width=16",
        "student.loss={l2=1.0,perceptual=0.5,adversarial=0.1}"]


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("losses") / "run"
    assert main(["teacher", "train", f"run.dir={run}", *TINY]) == 0
    assert main(["pairs", f"run.dir={run}", *TINY]) == 0
    return run


def test_student_with_discriminator_resumes_bitwise(pairs_run, tmp_path):
    """Three networks (student, its EMA, the discriminator) and two optimizers: stopped at step 3 and resumed to
    6, the run ends bitwise equal to 6 uninterrupted steps, discriminator and its optimizer included (on the CPU:
    GPU backward kernels are not deterministic)."""
    runs = {}
    for name, stops in (("straight", [6]), ("resumed", [3, 6])):
        run = tmp_path / name
        for steps in stops:
            assert main(["train", f"run.dir={run}", *TINY, "run.device=cpu", f"student.train.steps={steps}",
                         "student.train.extend=true",
                         f"--pairs={pairs_run / 'pairs'}", f"--teacher={pairs_run / 'teacher' / 'model.safetensors'}"]) == 0
        runs[name] = run / "student"
    a, b = (load_checkpoint(r / "checkpoints" / "step-00000006") for r in runs.values())
    assert set(a[0]) == {"model", "ema", "phase-disc"}
    for group in a[0]:
        for key, value in a[0][group].items():
            assert torch.equal(value, b[0][group][key]), (group, key)
    for key in ("optimizer", "phase_optimizers"):
        assert json.dumps(a[1][key], default=lambda t: t.tolist()) == json.dumps(b[1][key], default=lambda t: t.tolist())
    ma, mb = (load_model_file(r / "model")[0] for r in runs.values())
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    log = [json.loads(line) for line in (runs["straight"] / "log.jsonl").read_text().splitlines()]
    assert all(r["disc_loss"] > 0 for r in log) and len(log) == 6
    init = load_checkpoint(runs["resumed"] / "checkpoints" / "step-00000003")[0]["phase-disc"]
    assert any(not torch.equal(init[k], a[0]["phase-disc"][k]) for k in init if k.startswith("heads"))


def test_discriminator_under_torchrun(pairs_run, tmp_path):
    """Two gloo processes on the CPU train the student and its discriminator (each a DDP module, each its own
    phase)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "lmm.cli.main",
           "train", f"run.dir={run}", *TINY, "run.device=cpu", "student.train.steps=3", "student.train.batch_size=4",
           f"--pairs={pairs_run / 'pairs'}", f"--teacher={pairs_run / 'teacher' / 'model.safetensors'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tensors, state, _ = load_checkpoint(run / "student" / "checkpoints" / "step-00000003")
    assert "phase-disc" in tensors and state["world"] == 2 and "disc" in state["phase_optimizers"]
    log = [json.loads(line) for line in (run / "student" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(r["disc_loss"])) for r in log)


def _lpips_files(root: Path, net: str) -> None:
    """Files in the exact formats LPIPS reads: torchvision's backbone state dict in TORCH_HOME's hub cache (random
    weights, with a classifier entry as in the real file) and the lpips package's linear layers."""
    from lmm.nets.lpips import BACKBONE_FILES, CHANNELS, _features

    torch.manual_seed(0)
    backbone = {f"features.{k}": v for k, v in _features(net).state_dict().items()}
    backbone["classifier.1.weight"] = torch.zeros(2, 2)
    (root / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(backbone, root / "hub" / "checkpoints" / BACKBONE_FILES[net])
    weights = root / "site" / "lpips" / "weights" / "v0.1"
    weights.mkdir(parents=True, exist_ok=True)
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(CHANNELS[net])},
               weights / f"{net}.pth")


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_real_lpips_loads_its_files_and_names_the_missing_one(tmp_path, monkeypatch, net):
    import importlib

    from lmm.nets.lpips import BACKBONE_FILES

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    term = Perceptual(network=f"lpips_{net}", resolution=32)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "hub" / "checkpoints" / BACKBONE_FILES[net])):
        term.setup((1, 28, 28), 0)
    _lpips_files(tmp_path, net)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    term.setup((1, 28, 28), 0)
    x, pred = _images(2), _images(2, seed=1).requires_grad_(True)
    ctx = {"t": torch.zeros(2), "y": None, "step": 0}
    assert term(x, x, ctx).abs().max() < 1e-6
    d = term(pred, x, ctx)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert pred.grad.abs().sum() > 0


def test_adaptive_adversarial_weight_balances_gradient_norms():
    """adaptive=true: the adversarial term's gradient on the prediction is `weight` times the others' in norm."""
    from lmm.objectives import Lines

    obj = Lines(loss={"l2": 1.0, "adversarial": 0.5}, time_sampling="grid", grid=[0.0],
                loss_options={"adversarial": {"adaptive": True, "augment": [], "resolution": 32, "width": 8}})
    obj.setup((1, 28, 28), 0, reals=_Reals())
    x1, z = _images(6), torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    pred = _images(6, seed=5).requires_grad_(True)

    class Fixed(torch.nn.Module):
        def forward(self, x_t, t, y=None):
            return pred

    total = obj(Fixed(), {"z": z, "x1": x1}).sum()
    (g_total,) = torch.autograd.grad(total, pred)
    g_l2 = torch.autograd.grad(LOSSES["l2"]()(pred, x1, {}).sum(), pred)[0]
    torch.testing.assert_close((g_total - g_l2).norm(), 0.5 * g_l2.norm(), rtol=1e-4, atol=1e-8)

"""Class-conditional models end to end: labels from the dataset through the teacher, the pair store and the student
(and its discriminator) to `lmm sample --class K`, checked by a classifier trained inside the test."""
import numpy as np
import pytest
from PIL import Image

from lmm.cli.main import main

COND = ["run.progress=false", "data.conditional=true", "teacher.net.channels=16", "student.net.channels=16",
        "teacher.train.steps=200", "teacher.train.batch_size=64", "teacher.train.warmup_steps=50",
        "teacher.train.ema_halflife=2000.0", "teacher.steps=8", "pairs.n=1024", "pairs.shard_size=512",
        "student.train.steps=120", "student.train.batch_size=64", "student.train.warmup_steps=20",
        "student.train.ema_halflife=2000.0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cond") / "run"
    for stage in (["teacher", "train"], ["pairs"], ["train"]):
        assert main([*stage, f"run.dir={run}", *COND]) == 0
    return run


@pytest.fixture(scope="module")
def classifier():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    return LogisticRegression(max_iter=2000).fit(digits.images.reshape(-1, 64) / 16.0, digits.target)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_samples_honour_the_requested_class(run, classifier, tmp_path, role):
    for k in (0, 3, 7):
        out = tmp_path / f"{role}-{k}.npz"
        assert main(["sample", "--model", str(run / role), "--class", str(k), "-n", "40", "--out", str(out)]) == 0
        with np.load(out) as f:
            images, labels = f["images"], f["labels"]
        assert (labels == k).all()
        accuracy = (classifier.predict(images[..., 0].reshape(-1, 64) / 255.0) == k).mean()
        assert accuracy > 0.6, (role, k, accuracy)


def test_grids_have_one_row_per_class_and_bad_classes_are_refused(run, tmp_path, capsys):
    out = tmp_path / "all.npz"
    assert main(["sample", "--model", str(run / "student"), "-n", "100", "--out", str(out)]) == 0
    grid = Image.open(out.with_suffix(".png"))
    assert grid.size == (8 * 8 + 9 * 2, 10 * 8 + 11 * 2)  # 8 per row, one row per class, 8x8 images, 2-pixel gaps
    assert main(["sample", "--model", str(run / "student"), "--class", "10", "--out", str(tmp_path / "x.npz")]) == 2
    assert "class 10 is not one of the model's 10 classes" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_conditional_discriminator_sees_labels(run, tmp_path):
    assert main(["train", f"run.dir={tmp_path / 'adv'}", *COND, "student.train.steps=2",
                 "student.loss={l2=1.0,adversarial=0.1}", "student.adversarial.resolution=32",
                 "student.adversarial.width=16", f"--pairs={run / 'pairs'}",
                 f"--teacher={run / 'teacher' / 'model.safetensors'}"]) == 0
    from lmm.checkpoint import load_checkpoint

    import torch

    from lmm.losses.adversarial import ProjectedDiscriminator

    tensors, _, _ = load_checkpoint(tmp_path / "adv" / "student" / "checkpoints" / "step-00000002")
    state = tensors["phase-disc"]
    channels = [state[f"mix{k}"].shape[1] for k in range(4)]
    assert state["embed.0.weight"].shape == (10, 16)
    # the 2 discriminator steps trained the class embeddings: the labels reached the discriminator in training
    fresh = ProjectedDiscriminator(channels, width=16, num_classes=10, seed=0).state_dict()
    assert all(torch.equal(state[f"mix{k}"], fresh[f"mix{k}"]) for k in range(4))
    assert not any(torch.equal(state[f"embed.{k}.weight"], fresh[f"embed.{k}.weight"]) for k in range(4))
    disc = ProjectedDiscriminator(channels, width=16, num_classes=10, seed=0)
    disc.load_state_dict(state)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(10, c, s, s, generator=g) for c, s in zip(channels, (8, 4, 2, 1))]
    y = torch.arange(10)
    with torch.no_grad():
        logits = disc(feats, y)
        # the same images under other labels score differently, image by image
        assert ((logits - disc(feats, (y + 1) % 10)).abs() > 1e-6).all()
        assert ((logits - disc(feats, None)).abs() > 1e-6).all()
        # an unconditional discriminator (same mixing and heads, no embeddings) ignores labels
        plain = ProjectedDiscriminator(channels, width=16, num_classes=0, seed=0)
        plain.load_state_dict({k: v for k, v in state.items() if not k.startswith("embed.")})
        assert torch.equal(plain(feats, y), plain(feats, None)) and torch.equal(plain(feats, y), disc(feats, None))

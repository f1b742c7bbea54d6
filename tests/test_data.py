import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.data import (
    ImageData,
    TensorSource,
    load_dataset,
    read_idx,
    save_image_grid,
    to_uint8,
)
from lmm.data.fashion_mnist import FASHION_MNIST_ROOT


def test_digits_shape_range_labels():
    d = load_dataset("digits")
    assert isinstance(d, ImageData) and d.name == "digits"
    assert d.x.shape == (1797, 1, 8, 8) and d.x.dtype == torch.float32
    assert d.x.min() == -1.0 and d.x.max() == 1.0
    assert torch.equal((d.x + 1) * 8, ((d.x + 1) * 8).round())
    assert d.y.dtype == torch.int64 and d.num_classes == 10
    assert set(d.y.tolist()) == set(range(10))
    assert d.tensors().keys() == {"x", "y"}


@pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT).is_dir(),
    reason=f"{FASHION_MNIST_ROOT} absent (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_loads():
    test = load_dataset("fashion_mnist", split="test")
    assert test.x.shape == (10000, 1, 28, 28) and test.num_classes == 10
    assert test.x.min() == -1.0 and test.x.max() == 1.0
    assert torch.bincount(test.y).tolist() == [1000] * 10
    u = (test.x + 1) * 127.5
    assert torch.allclose(u, u.round(), atol=1e-4)
    train = load_dataset("fashion_mnist")
    assert train.x.shape == (60000, 1, 28, 28) and train.y.shape == (60000,)


def _write_idx(path: Path, magic: int, arr: np.ndarray) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_from_small_idx_files(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.array([0, 1, 2, 3, 9]))
    d = load_dataset("fashion_mnist", root=tmp_path, split="test")
    assert d.x.shape == (5, 1, 28, 28)
    assert torch.allclose(d.x[:, 0], torch.from_numpy(imgs).float() / 127.5 - 1)
    assert d.y.tolist() == [0, 1, 2, 3, 9]


def test_idx_bad_magic_and_size_name_the_file(tmp_path):
    bad = tmp_path / "bad-images-idx3-ubyte.gz"
    _write_idx(bad, 1234, np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="bad-images-idx3-ubyte.gz.*magic number 1234"):
        read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(struct.pack(">IIII", 2051, 2, 3, 3) + b"\0" * 10)
    with pytest.raises(ValueError, match="short.gz has 26 bytes"):
        read_idx(short)


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*data.root=DIR"):
        load_dataset("fashion_mnist", root=tmp_path / "nowhere")


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def test_image_folder_crop_resize_labels(tmp_path):
    wide = np.zeros((20, 40, 3))
    wide[:, 10:30] = 255
    _png(tmp_path / "dog" / "a.png", wide)
    _png(tmp_path / "cat" / "sub" / "b.png", np.full((16, 16, 3), 0))
    Image.fromarray(np.full((32, 24, 3), 255, dtype=np.uint8)).save(tmp_path / "cat" / "c.JPG")
    d = load_dataset("image_folder", root=tmp_path, resolution=8, channels=3, labels=True)
    assert d.x.shape == (3, 3, 8, 8) and d.classes == ["cat", "dog"] and d.num_classes == 2
    assert d.y.tolist() == [0, 0, 1]
    assert torch.all(d.x[2] == 1.0)
    assert torch.all(d.x[1] == -1.0)
    assert d.x[0].min() > 0.9
    grey = load_dataset("image_folder", root=tmp_path, resolution=4, channels=1)
    assert grey.x.shape == (3, 1, 4, 4) and grey.y is None and grey.num_classes == 0


def test_image_folder_errors_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty holds no"):
        load_dataset("image_folder", root=empty, resolution=8)
    _png(tmp_path / "ok" / "a.png", np.zeros((8, 8, 3)))
    (tmp_path / "ok" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset("image_folder", root=tmp_path / "ok", resolution=8)
    with pytest.raises(ValueError, match="a.png is not"):
        load_dataset("image_folder", root=tmp_path / "ok", resolution=8, labels=True)
    with pytest.raises(ValueError, match="needs a directory"):
        load_dataset("image_folder", resolution=8)


@pytest.mark.parametrize("kind", ["moons", "8gaussians", "checkerboard"])
def test_toys_shape_seeded_unit_scale(kind):
    a = load_dataset("toy", kind=kind, n=4000, seed=1)
    b = load_dataset("toy", kind=kind, n=4000, seed=1)
    c = load_dataset("toy", kind=kind, n=4000, seed=2)
    assert a.x.shape == (4000, 2) and a.x.dtype == torch.float32 and a.y is None
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert torch.allclose(a.x.std(0), torch.ones(2), atol=0.15)
    assert a.x.mean(0).abs().max() < 0.15


def test_load_dataset_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['kindd'\]"):
        load_dataset("toy", kindd="moons")
    with pytest.raises(ValueError, match="toy kind='spiral'"):
        load_dataset("toy", kind="spiral")


def test_to_uint8_and_image_grid(tmp_path):
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5)
    assert to_uint8(x).reshape(-1).tolist() == [0, 0, 128, 255, 255]
    imgs = torch.linspace(-1, 1, 5).reshape(5, 1, 1, 1).expand(5, 3, 4, 6)
    path = save_image_grid(imgs, tmp_path / "out" / "grid.png", nrow=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 6 + 2, 3 * 8 + 2, 3)
    assert (grid[2 + 6 : 2 + 6 + 4, 2 + 8 : 2 + 8 + 6] == to_uint8(imgs[4:5])[0]).all()
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]
    grey = save_image_grid(to_uint8(imgs[:, :1]), tmp_path / "g.png", nrow=8)
    assert np.asarray(Image.open(grey)).shape == (4 + 4, 5 * 8 + 2)


def test_tensor_source_deterministic_and_world_invariant():
    data = {"x": torch.arange(23).float().unsqueeze(1), "y": torch.arange(23)}
    a, b = TensorSource(data, seed=5), TensorSource(data, seed=5)
    assert len(a) == 23
    for step in (0, 3, 17):
        one = a.batch(step, 0, 1, 8)
        halves = [b.batch(step, r, 2, 4) for r in (0, 1)]
        assert torch.equal(one["y"], torch.cat([h["y"] for h in halves]))
        assert torch.equal(one["x"][:, 0].long(), one["y"])
    assert not torch.equal(a.batch(0, 0, 1, 8)["y"], TensorSource(data, seed=6).batch(0, 0, 1, 8)["y"])


def test_tensor_source_epochs_cover_every_sample_once():
    n, b = 10, 3
    src = TensorSource({"y": torch.arange(n)}, seed=0)
    stream = torch.cat([src.batch(s, 0, 1, b)["y"] for s in range(10)])
    epochs = stream.reshape(3, n)
    for e in range(3):
        assert sorted(epochs[e].tolist()) == list(range(n))
    assert not torch.equal(epochs[0], epochs[1])
    straddle = src.batch(3, 0, 1, b)["y"]
    assert straddle[0] == epochs[0, 9] and torch.equal(straddle[1:], epochs[1, :2])

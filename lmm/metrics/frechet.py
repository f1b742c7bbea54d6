"""Streaming feature statistics and the Frechet distance between two Gaussians.

FD(N(mu1, S1), N(mu2, S2)) = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)),
computed in float64 as in the reference FID code (pytorch-fid / TTUR), with the same safeguards.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
from torch import Tensor

ArrayLike = np.ndarray | Tensor


def _f64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


class FeatureStats:
    """Streaming mean and covariance of features (N, D), accumulated in float64.

    Uses the pairwise (Chan et al.) update of mean and centred sum of squares, so adding in
    chunks, adding in any order, or merging per-rank statistics gives the same result as one
    pass over all features (up to float64 rounding). With ``keep_features=True`` the float32
    features are kept too (for precision/recall). Statistics read from a file that records no count
    (``from_moments(n=None)``, e.g. EDM's reference files) have ``n`` None: they give ``mu`` and
    ``sigma`` as stored and cannot be extended or merged.
    """

    def __init__(self, dim: int | None = None, keep_features: bool = False) -> None:
        self.dim = dim
        self.keep_features = keep_features
        self.n: int | None = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None
        self._sigma: Tensor | None = None
        self._features: list[Tensor] = []

    def _init(self, dim: int) -> None:
        if self.dim is not None and self.dim != dim:
            raise ValueError(f"FeatureStats: features have dim {dim}, expected {self.dim}")
        self.dim = dim
        if self._mean is None:
            self._mean = torch.zeros(dim, dtype=torch.float64)
            self._m2 = torch.zeros(dim, dim, dtype=torch.float64)

    def _combine(self, n_b: int | None, mean_b: Tensor, m2_b: Tensor) -> None:
        if self.n is None or n_b is None:
            raise ValueError("FeatureStats: statistics without a count (from_moments(n=None)) cannot be extended "
                             "or merged")
        n_a = self.n
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean += delta * (n_b / n)
        self._m2 += m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.n = n

    def add(self, feats: ArrayLike) -> None:
        """Add a batch of features (B, D)."""
        x = torch.as_tensor(feats).detach()
        if x.ndim != 2:
            raise ValueError(f"FeatureStats.add: expected features (B, D), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        self._init(x.shape[1])
        if self.keep_features:
            self._features.append(x.to("cpu", torch.float32))
        x = x.to("cpu", torch.float64)
        mean_b = x.mean(0)
        d = x - mean_b
        self._combine(x.shape[0], mean_b, d.T @ d)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold ``other`` into ``self`` (in place) and return ``self``."""
        if other.n == 0:
            return self
        if self.keep_features != other.keep_features:
            raise ValueError("FeatureStats.merge: one side keeps features and the other does not")
        self._init(other.dim)
        self._combine(other.n, other._mean, other._m2)
        self._features.extend(other._features)
        return self

    @property
    def mu(self) -> np.ndarray:
        """Mean (D,) float64."""
        if self.n is not None and self.n < 1:
            raise ValueError("FeatureStats.mu: no features were added")
        return self._mean.numpy().copy()

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (D, D) float64 (divides by n - 1, as numpy.cov); as stored when ``n`` is None."""
        if self.n is None:
            return self._sigma.numpy().copy()
        if self.n < 2:
            raise ValueError(f"FeatureStats.sigma: needs at least 2 samples, have {self.n}")
        return (self._m2 / (self.n - 1)).numpy()

    @property
    def features(self) -> Tensor | None:
        """The added features (n, D) float32 if ``keep_features``, else None."""
        if not self.keep_features:
            return None
        if not self._features:
            return torch.empty(0, self.dim or 0)
        if len(self._features) > 1:
            self._features = [torch.cat(self._features)]
        return self._features[0]

    @classmethod
    def from_moments(cls, mu: ArrayLike, sigma: ArrayLike, n: int | None,
                     features: ArrayLike | None = None) -> FeatureStats:
        """Rebuild statistics from a mean (D,), unbiased covariance (D, D) and count (None when not recorded: the
        statistics then keep ``sigma`` as given and cannot be extended or merged)."""
        mu_t = torch.from_numpy(_f64(mu))
        sigma_t = torch.from_numpy(_f64(sigma))
        if sigma_t.shape != (mu_t.shape[0], mu_t.shape[0]):
            raise ValueError(f"FeatureStats.from_moments: sigma shape {tuple(sigma_t.shape)} "
                             f"does not match mu {tuple(mu_t.shape)}")
        s = cls(dim=mu_t.shape[0], keep_features=features is not None)
        s._mean = mu_t.clone()
        if n is None:
            s.n, s._sigma = None, sigma_t.clone()
        else:
            s.n = int(n)
            s._m2 = sigma_t * max(s.n - 1, 0)
        if features is not None:
            s._features = [torch.as_tensor(features, dtype=torch.float32)]
        return s

    def all_gather(self, group: dist.ProcessGroup | None = None) -> FeatureStats:
        """Statistics over all ranks of ``group`` (merged in rank order, so every rank gets the same).

        Returns ``self`` unchanged when torch.distributed is not initialised.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        state = (self.n, self.dim, self._mean, self._m2, self.features)
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, state, group=group)
        out = FeatureStats(dim=self.dim, keep_features=self.keep_features)
        for n, dim, mean, m2, feats in gathered:
            if n == 0:
                continue
            part = FeatureStats(dim=dim, keep_features=self.keep_features)
            part.n, part._mean, part._m2 = n, mean, m2
            if feats is not None:
                part._features = [feats]
            out.merge(part)
        return out


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike,
                     eps: float = 1e-6, imag_atol: float = 1e-3) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D).

    float64 throughout. If sqrtm(sigma1 sigma2) is not finite (near-singular product), both
    covariances get ``eps * I`` added and it is recomputed. A small imaginary part from
    numerical error is dropped; one larger than ``imag_atol`` on the diagonal raises ValueError.
    """
    mu1, mu2 = np.atleast_1d(_f64(mu1)), np.atleast_1d(_f64(mu2))
    sigma1, sigma2 = np.atleast_2d(_f64(sigma1)), np.atleast_2d(_f64(sigma2))
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: mu1 shape {mu1.shape} != mu2 shape {mu2.shape}")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"frechet_distance: {name} shape {s.shape}, expected {(d, d)}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # singular products are handled below
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > imag_atol:
            raise ValueError(f"frechet_distance: sqrtm(sigma1 sigma2) has imaginary component {imag:.3g} "
                             f"> {imag_atol:g}; covariances are too ill-conditioned (too few samples?)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_stats(a: FeatureStats, b: FeatureStats, **kw) -> float:
    """Frechet distance between the Gaussians fitted by two FeatureStats."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, **kw)

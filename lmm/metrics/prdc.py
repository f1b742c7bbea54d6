"""Improved precision and recall (Kynkaanniemi et al. 2019) with bounded-memory distance computation."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _as_f32(x: Tensor | np.ndarray, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().float()
    if t.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {tuple(t.shape)}")
    return t


def _rows_per_chunk(n_cols: int, max_bytes: int) -> int:
    return max(1, max_bytes // (4 * max(n_cols, 1)))


def knn_radii(feats: Tensor, k: int, max_bytes: int = 256 << 20) -> Tensor:
    """Distance of each row of feats (N, D) to its k-th nearest other row -> (N,)."""
    n = feats.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"knn_radii: need 1 <= k < N, got k={k}, N={n}")
    out = torch.empty(n, dtype=feats.dtype, device=feats.device)
    step = _rows_per_chunk(n, max_bytes)
    for i in range(0, n, step):
        d = torch.cdist(feats[i:i + step], feats)
        out[i:i + step] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def nearest_rows(queries: Tensor, bank: Tensor, k: int = 2, max_bytes: int = 256 << 20) -> tuple[Tensor, Tensor]:
    """Euclidean distances (N, k), ascending, and indices (N, k) of the k rows of bank (M, D) nearest to each row
    of queries (N, D): the memorisation check of a generator against its training set."""
    queries, bank = _as_f32(queries, "nearest_rows: queries"), _as_f32(bank, "nearest_rows: bank")
    if queries.shape[1] != bank.shape[1] or not 1 <= k <= bank.shape[0]:
        raise ValueError(f"nearest_rows: need equal widths and 1 <= k <= M, got queries {tuple(queries.shape)}, "
                         f"bank {tuple(bank.shape)}, k={k}")
    dist, index = [], []
    step = _rows_per_chunk(bank.shape[0], max_bytes)
    for i in range(0, queries.shape[0], step):
        q = queries[i:i + step]
        j = torch.cdist(q, bank).topk(k, dim=1, largest=False).indices
        d, order = (q[:, None] - bank[j]).norm(dim=2).sort(dim=1)  # exact: cdist's matmul form loses ~1e-3 near 0
        dist.append(d)
        index.append(j.gather(1, order))
    return torch.cat(dist), torch.cat(index)


def subset_indices(n: int, m: int, seed: int) -> Tensor:
    """Increasing indices (min(m, n),) of a random subset of m of n rows drawn with ``seed`` (all rows when m >= n),
    for precision/recall on equal numbers of real and generated samples as Kynkaanniemi et al. compute it."""
    if m < 1:
        raise ValueError(f"subset_indices: need m >= 1, got {m}")
    if m >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].sort().values


def _covered(queries: Tensor, centres: Tensor, radii: Tensor, max_bytes: int) -> Tensor:
    """Bool (Q,): whether each query lies in at least one ball (centres (M, D), radii (M,))."""
    out = torch.empty(queries.shape[0], dtype=torch.bool, device=queries.device)
    step = _rows_per_chunk(centres.shape[0], max_bytes)
    for i in range(0, queries.shape[0], step):
        out[i:i + step] = (torch.cdist(queries[i:i + step], centres) <= radii[None]).any(dim=1)
    return out


def precision_recall(real_feats: Tensor | np.ndarray, fake_feats: Tensor | np.ndarray, k: int = 3,
                     max_bytes: int = 256 << 20, device: str | torch.device | None = None,
                     real_radii: Tensor | None = None) -> dict[str, float]:
    """Precision and recall of fake (M, D) against real (N, D) features.

    Each set's manifold is the union of balls around its samples with radius the distance to
    the sample's k-th nearest neighbour in the same set. precision = fraction of fakes inside
    the real manifold; recall = fraction of reals inside the fake manifold. Pairwise distances
    (float32, torch.cdist) are computed in row chunks of at most ``max_bytes``. ``real_radii``
    (N,): ``knn_radii(real_feats, k)`` when already known (it does not depend on the fakes).
    """
    real = _as_f32(real_feats, "precision_recall: real_feats")
    fake = _as_f32(fake_feats, "precision_recall: fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: real dim {real.shape[1]} != fake dim {fake.shape[1]}")
    if device is not None:
        real, fake = real.to(device), fake.to(device)
    if real_radii is not None and tuple(real_radii.shape) != (real.shape[0],):
        raise ValueError(f"precision_recall: real_radii shape {tuple(real_radii.shape)}, expected ({real.shape[0]},)")
    r_real = knn_radii(real, k, max_bytes) if real_radii is None else real_radii.to(real.device, torch.float32)
    r_fake = knn_radii(fake, k, max_bytes)
    precision = _covered(fake, real, r_real, max_bytes).float().mean().item()
    recall = _covered(real, fake, r_fake, max_bytes).float().mean().item()
    return {"precision": precision, "recall": recall}

"""Couplings of a noise batch with a data batch: which noise sample travels to which data sample."""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def ot_permutation(a: Tensor, b: Tensor) -> Tensor:
    """The exact optimal-transport matching of two equal-size batches under squared Euclidean cost.

    a, b: (B, ...) -> perm (B,) long on a's device with sum_i ||a_i - b_perm[i]||^2 minimal. For two empirical
    measures of B equally weighted points the optimal plan is a permutation (Birkhoff), so this equals the
    exact plan of POT's `ot.emd` on uniform weights; it is solved as an assignment problem in float64.
    """
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"ot_permutation needs two batches of one shape (B, ...), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    fa, fb = a.detach().flatten(1).double().cpu(), b.detach().flatten(1).double().cpu()
    cost = torch.cdist(fa, fb).square_().numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm).to(a.device)


def matched_cost(a: Tensor, b: Tensor) -> Tensor:
    """(B,) squared distances ||a_i - b_i||^2 of two batches (B, ...) paired index by index."""
    return (a - b).flatten(1).square().sum(1)

"""OT-CFM (Tong et al. 2024, Pooladian et al. 2023): flow matching on data with a mini-batch optimal-transport coupling."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmm.couplings import ot_permutation
from lmm.losses.l2 import l2
from lmm.nets.precond import LinesModel
from lmm.objectives.base import Objective, bcast

COUPLINGS = ("ot", "independent")


class OTCFM(Objective):
    """L = mean over dims of (v(x_t, t) - (x - z))^2 on dataset batches {"x", "y" optional}: z ~ N(0, I) drawn per
    batch and re-ordered by the exact OT matching of the batch's noise to its images (lmm.couplings.ot_permutation,
    squared Euclidean cost), x_t = (1-t) z + t x + sigma eps, t ~ U[0, 1).

    The OT batch is the per-process training batch (student.train.batch_size): under torchrun each process
    couples its own batch. coupling = "independent" gives plain (I-)CFM. The model is a LinesModel with the
    "velocity" parameterisation, so the line sampler on the uniform grid is Euler on the learned velocity.
    """

    name = "ot_cfm"
    required_keys = ("x",)
    source = "data"

    def __init__(self, sigma: float = 0.0, coupling: str = "ot") -> None:
        super().__init__()
        if sigma < 0:
            raise ValueError(f"student.ot_cfm.sigma must be >= 0, got {sigma}")
        if coupling not in COUPLINGS:
            raise ValueError(f"student.ot_cfm.coupling: unknown {coupling!r}; valid: {', '.join(COUPLINGS)}")
        self.sigma, self.coupling = float(sigma), coupling

    reads = ("ot_cfm",)

    @classmethod
    def from_config(cls, scfg: dict, tcfg: dict | None) -> OTCFM:
        return cls(**scfg["ot_cfm"])

    def build_model(self, net: nn.Module) -> nn.Module:
        return LinesModel(net, precond="velocity")

    def couple(self, z: Tensor, x: Tensor) -> Tensor:
        """z (B, ...) re-ordered so that z[i] travels to x[i]."""
        return z[ot_permutation(x, z)] if self.coupling == "ot" else z

    def forward(self, model: nn.Module, batch: dict[str, Tensor], step: int = 0) -> Tensor:
        self._check_batch(batch)
        x = batch["x"]
        z = self.couple(torch.randn_like(x), x)
        t = torch.rand(x.shape[0], dtype=x.dtype, device=x.device)
        x_t = bcast(1 - t, x) * z + bcast(t, x) * x
        if self.sigma > 0:
            x_t = x_t + self.sigma * torch.randn_like(x)
        return l2(model.net(x_t, 1000 * t, batch.get("y")), x - z)

"""OT-CFM (Tong et al. 2024, Pooladian et al. 2023): flow matching on data with a mini-batch optimal-transport coupling."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from lmm.couplings import ot_permutation
from lmm.nets.precond import LinesModel
from lmm.objectives.flow_matching import FlowMatching
from lmm.registry import option

COUPLINGS = ("ot", "independent")


class OTCFM(FlowMatching):
    """Flow matching (lmm.objectives.flow_matching) on dataset batches {"x", "y" optional} with each batch's noise
    re-ordered by the exact OT matching to its images (lmm.couplings.ot_permutation, squared Euclidean cost),
    x_t = (1-t) z + t x + sigma eps, t ~ U[0, 1).

    The OT batch is the per-process training batch (student.train.batch_size): under torchrun each process
    couples its own batch. coupling = "independent" gives plain (I-)CFM. The model is a LinesModel with the
    "velocity" parameterisation, so the line sampler on the uniform grid is Euler on the learned velocity.
    """

    name = "ot_cfm"
    source = "data"
    reads = ("ot_cfm",)

    @dataclass(frozen=True)
    class Options:
        sigma: float = option(0.0, min=0.0)
        coupling: str = option("ot", choices=COUPLINGS)

    def __init__(self, sigma: float = Options.sigma, coupling: str = Options.coupling) -> None:
        super().__init__()
        if sigma < 0:
            raise ValueError(f"student.ot_cfm.sigma must be >= 0, got {sigma}")
        if coupling not in COUPLINGS:
            raise ValueError(f"student.ot_cfm.coupling: unknown {coupling!r}; valid: {', '.join(COUPLINGS)}")
        self.sigma, self.coupling = float(sigma), coupling

    @classmethod
    def from_config(cls, scfg: dict, tcfg: dict | None) -> OTCFM:
        return cls(**scfg["ot_cfm"])

    def build_model(self, net: nn.Module) -> nn.Module:
        return LinesModel(net, precond="velocity")

    def couple(self, z: Tensor, x: Tensor) -> Tensor:
        return z[ot_permutation(x, z)] if self.coupling == "ot" else z

    def velocity(self, model: nn.Module, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return model.net(x_t, 1000 * t, y)

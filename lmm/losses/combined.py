"""The weighted sum of loss terms that a student objective minimises between a prediction and its target."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmm.losses import LOSSES, check_loss
from lmm.losses.base import LossTerm


class LossSum(nn.Module):
    """sum_k w_k d_k(pred, target, ctx) over the terms of `loss` {name: weight} (checked by `check_loss`), each built
    from its options in `loss_options` {name: {option: value}}. An adaptive adversarial term (lmm.losses.adversarial)
    has its weight rescaled at each step so that its gradient on the prediction has `weight` times the norm of
    the other terms' (VQGAN's adaptive weight, taken at the prediction instead of the last layer, so no network
    parameter is touched)."""

    def __init__(self, loss: dict[str, float], loss_options: dict[str, dict] | None = None) -> None:
        super().__init__()
        self.weights = check_loss(loss)
        self.options = {k: dict(v) for k, v in (loss_options or {}).items() if k in self.weights}
        self.terms: nn.ModuleDict = nn.ModuleDict({k: LOSSES[k](**self.options.get(k, {})) for k in self.weights})

    def setup(self, data_shape: tuple[int, ...], num_classes: int, reals: Any = None) -> None:
        """Load the terms' networks (lmm.losses.base.LossTerm.setup); terms share the frozen ones they have in common."""
        shared: dict = {}
        for term in self.terms.values():
            term.setup(tuple(data_shape), num_classes, reals, shared=shared)

    def phases(self) -> list:
        return [p for term in self.terms.values() for p in term.phases()]

    def networks(self) -> list[nn.Module]:
        """The terms' networks (LossTerm.networks), each once; none with an R1 penalty, whose double backward
        (through the discriminator and the pyramid the terms share) cannot run through compiled graphs."""
        if "adversarial" in self.terms and self.terms["adversarial"].r1 > 0:
            return []
        return list({id(n): n for term in self.terms.values() for n in term.networks()}.values())

    def forward(self, pred: Tensor, target: Tensor, ctx: dict[str, Any]) -> Tensor:
        """pred, target (B, ...) -> (B,)."""
        parts = {name: self.terms[name](pred, target, ctx) for name in self.weights}
        weights: dict[str, Any] = dict(self.weights)
        adv: LossTerm | None = self.terms["adversarial"] if "adversarial" in self.terms else None
        if adv is not None and adv.adaptive and ctx["step"] >= adv.start and pred.requires_grad:
            weights["adversarial"] *= self._adaptive_scale(pred, parts, weights)
        return sum(weights[name] * part for name, part in parts.items())

    @staticmethod
    def _adaptive_scale(pred: Tensor, parts: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
        """||grad_pred of the other terms|| / ||grad_pred of the adversarial term||, detached, at most 1e4."""
        rest = sum(weights[name] * part for name, part in parts.items() if name != "adversarial")
        (g_rest,) = torch.autograd.grad(rest.sum(), pred, retain_graph=True)
        (g_adv,) = torch.autograd.grad(parts["adversarial"].sum(), pred, retain_graph=True)
        return (g_rest.float().norm() / (g_adv.float().norm() + 1e-8)).clamp(max=1e4).detach()

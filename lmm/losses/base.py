"""The loss-term interface: one term of a student's loss, combined with others by a weighted sum."""
from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn


class LossTerm(nn.Module):
    """forward(pred, target, ctx) -> (B,) per-sample loss.

    pred: the student's predicted endpoint, target: the teacher's endpoint x1, both (B, C, H, W) in [-1, 1]
    (or (B, D) for vector data). ctx: {"t": (B,) line times, "y": (B,) labels or None, "step": int}.
    Options: a frozen dataclass `Options` (lmm.registry.option fields) whose fields are the constructor's keyword
    arguments and whose defaults those arguments take; the config table named after the term (`student.<name>`,
    e.g. `student.adversarial`) is made from it and handed to the constructor.
    A term that needs networks loads them in `setup` (frozen ones with requires_grad False; they move with the
    objective to the device); a term that trains a network of its own returns its `phases()` (lmm.train.Phase).
    """

    name: ClassVar[str]

    def setup(self, data_shape: tuple[int, ...], num_classes: int, reals: Any = None, shared: dict | None = None
              ) -> None:
        """Load networks for data of `data_shape` (C, H, W); `reals` is a BatchSource of dataset images
        {"x", "y"} for terms that compare with real data; `shared` holds frozen networks the terms of one loss
        share (lmm.nets.pyramid.shared_pyramid)."""

    def phases(self) -> list:
        """Extra optimisation phases (lmm.train.Phase) this term trains, e.g. a discriminator's."""
        return []

    def networks(self) -> list[nn.Module]:
        """The networks its forward (and its phases) run, which the training loop compiles with run.compile."""
        return []

    def forward(self, pred: Tensor, target: Tensor, ctx: dict[str, Any]) -> Tensor:
        raise NotImplementedError

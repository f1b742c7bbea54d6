"""Objective interface: wraps a raw net in its model and turns (model, batch) into per-sample losses."""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from lmm.nets.precond import bcast

__all__ = ["Objective", "bcast", "sample_times"]


class Objective(nn.Module):
    """A training objective: forward(model, batch, step) -> per-sample loss (B,) of the model's own phase.

    batch keys: image data {"x": (B, ...), "y": (B,) optional}; pair stores {"z", "x1", "y" optional}.
    Randomness comes from torch's global RNG (the train loop seeds it per step). An objective is a module so
    that the networks its loss terms hold (frozen feature networks, a discriminator) move with it to the
    device; networks it trains besides the model come with their own optimisation phases (`phases`).
    """

    name: str
    required_keys: tuple[str, ...] = ()

    def build_model(self, net: nn.Module) -> nn.Module:
        """Wrap a raw net F(x, noise_label, class_labels) in this objective's preconditioned model."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: dict[str, Tensor], step: int = 0) -> Tensor:
        """Per-sample loss (B,) at training step `step`."""
        raise NotImplementedError

    def phases(self) -> list:
        """Extra optimisation phases (lmm.train.Phase) run after the model's own at each step; none by default."""
        return []

    def config(self) -> dict:
        """The constructor arguments that rebuild this objective (JSON-serialisable)."""
        params = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {p: list(v) if isinstance(v := getattr(self, p), tuple) else v for p in params}

    def _check_batch(self, batch: dict[str, Tensor]) -> None:
        missing = [k for k in self.required_keys if k not in batch]
        if missing:
            raise ValueError(
                f"objective {self.name!r} needs batch keys {list(self.required_keys)}; "
                f"missing {missing} (got {sorted(batch)})"
            )


def sample_times(n: int, time_sampling: str, logit_mean: float, logit_std: float, like: Tensor) -> Tensor:
    """(n,) times in [0, 1] with like's dtype/device: "uniform" U[0, 1) or "logit_normal" sigmoid(N(m, s^2))."""
    if time_sampling == "uniform":
        return torch.rand(n, dtype=like.dtype, device=like.device)
    if time_sampling == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, dtype=like.dtype, device=like.device))
    raise ValueError(f"unknown time_sampling {time_sampling!r}")

"""Objective interface: wraps a raw net in its model and turns (model, batch) into per-sample losses."""
from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lmm.nets.precond import bcast

__all__ = ["Objective", "STUDENT_KEYS_ALWAYS_READ", "STUDENT_PRECONDS", "bcast", "constant", "line_point",
           "loss_config", "sample_times", "student_precond"]


class Objective(nn.Module):
    """A training objective: forward(model, batch, step) -> per-sample loss (B,) of the model's own phase.

    batch keys: image data {"x": (B, ...), "y": (B,) optional}; pair stores {"z", "x1", "y" optional}.
    Randomness comes from torch's global RNG (the train loop seeds it per step). An objective is a module so
    that the networks its loss terms hold (frozen feature networks, a discriminator) move with it to the
    device; networks it trains besides the model come with their own optimisation phases (`phases`).
    """

    name: str
    required_keys: tuple[str, ...] = ()
    # what a student objective trains on: "pairs" (a pair store's {"z", "x1"}) or "data" (dataset images {"x"})
    source: ClassVar[str] = "pairs"
    needs_teacher: ClassVar[bool] = False
    # the few-step sampler of the models it trains (lmm.sampling.sample_lines mode): "line" or "restart"
    sampler: ClassVar[str] = "line"
    # the keys of config section `student` that `from_config` reads besides STUDENT_KEYS_ALWAYS_READ
    reads: ClassVar[tuple[str, ...]] = ()

    def build_model(self, net: nn.Module) -> nn.Module:
        """Wrap a raw net F(x, noise_label, class_labels) in this objective's preconditioned model."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: dict[str, Tensor], step: int = 0) -> Tensor:
        """Per-sample loss (B,) at training step `step`."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, scfg: dict, tcfg: dict | None) -> Objective:
        """The objective of config section `student` (scfg), for a teacher described by its `teacher` config
        section (tcfg; None for objectives without a teacher). Student objectives implement it."""
        raise NotImplementedError(f"objective {cls.name!r} is not a student objective")

    def setup(self, data_shape: tuple[int, ...], num_classes: int, *, reals: Any = None, teacher: Any = None,
              model: nn.Module | None = None) -> None:
        """Load what the loss needs besides the batch, for data (C, H, W) with `num_classes` classes: the networks
        of its loss terms, dataset images `reals` (a BatchSource of {"x", "y"}), the frozen `teacher`
        (lmm.teachers.Teacher, for objectives with needs_teacher), the `model` it will train (initialised)."""

    def train_state(self) -> dict[str, Tensor]:
        """Tensors the objective updates during training besides the model and its phases (e.g. an EMA target),
        checkpointed by the training loop and given back to `load_train_state` on resume; none by default."""
        return {}

    def load_train_state(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"objective {self.name!r} keeps no training state, got {sorted(state)[:5]}")

    def phases(self) -> list:
        """Extra optimisation phases (lmm.train.Phase) run after the model's own at each step; none by default."""
        return []

    def networks(self) -> list[nn.Module]:
        """The networks its loss runs besides the model (frozen feature networks, a teacher, a discriminator),
        which the training loop compiles with run.compile (lmm.compiled.compile_network); none by default."""
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


@functools.lru_cache(maxsize=64)
def constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """torch.tensor(values) (len(values),) on `device`, made once per (values, dtype, device), so that a training
    step indexes it without a host-to-device copy; never modify it in place."""
    return torch.tensor(values, dtype=dtype, device=device)


def line_point(z: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) z + t x1 of z, x1 (B, ...) at times t (B,)."""
    return bcast(1 - t, x1) * z + bcast(t, x1) * x1


def sample_times(n: int, time_sampling: str, logit_mean: float, logit_std: float, like: Tensor) -> Tensor:
    """(n,) times in [0, 1] with like's dtype/device: "uniform" U[0, 1) or "logit_normal" sigmoid(N(m, s^2))."""
    if time_sampling == "uniform":
        return torch.rand(n, dtype=like.dtype, device=like.device)
    if time_sampling == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, dtype=like.dtype, device=like.device))
    raise ValueError(f"unknown time_sampling {time_sampling!r}")


STUDENT_PRECONDS = ("teacher", "lines", "none")
STUDENT_KEYS_ALWAYS_READ = ("objective", "init", "net", "train")


def loss_config(scfg: dict) -> dict[str, Any]:
    """{loss, loss_options} of config section `student`: the term weights `student.loss` and, per term, its options
    table `student.<term>` (lmm.losses.combined.LossSum)."""
    return {"loss": scfg["loss"], "loss_options": {k: scfg[k] for k in scfg["loss"] if isinstance(scfg.get(k), dict)}}


def student_precond(precond: str, sigma_data: float, tcfg: dict | None) -> dict[str, Any]:
    """LinesModel arguments {precond, sigma_data, sigma_max, denoiser} of a student's `precond` (one of
    STUDENT_PRECONDS): "teacher" takes the line parameterisation of the teacher described by tcfg (its `teacher`
    config section: kind, sigma_max, sigma_data, denoiser), so that a student initialised from the teacher's
    weights starts as the teacher's own endpoint predictor."""
    from lmm.nets.precond import PARAMETERISATIONS
    from lmm.teachers import TEACHERS

    if precond not in STUDENT_PRECONDS:
        raise ValueError(f"student.precond: unknown {precond!r}; valid: {', '.join(STUDENT_PRECONDS)}")
    tcfg = tcfg or {}
    out = {"precond": precond, "sigma_data": float(sigma_data), "sigma_max": float(tcfg.get("sigma_max", 80.0)),
           "denoiser": tcfg.get("denoiser", "edm")}
    if precond == "teacher":
        out["precond"] = TEACHERS.get(tcfg.get("kind")).line_precond
        if PARAMETERISATIONS.get(out["precond"]).teacher_sigma_data:
            out["sigma_data"] = float(tcfg["sigma_data"])
    return out

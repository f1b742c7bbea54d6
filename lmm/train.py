"""The one training loop: AdamW/Adam, LR warmup, grad clipping, EMA, bf16 autocast, DDP, checkpoints, resume.

    train(model, objective, source, settings, *, run_dir, meta, resume_defaults=None) -> EMA model

`settings` is a TrainSettings (the optimisation and loop settings, validated on construction; `from_config`
builds it from a `*.train` config table). `objective` follows the TrainObjective protocol, which
lmm.objectives.Objective implements; `as_objective(fn)` adapts a plain loss function. `source` is a
BatchSource: batch(step, rank, world, batch_size) -> {key: (batch_size, ...) tensor}.

Exactness: the global RNG is reseeded at every step from (seed, step, rank) and batches come from a
BatchSource that is a function of the step, so a resumed run equals an uninterrupted one bitwise (on the CPU;
on a GPU with run.deterministic, see lmm.dist.set_kernels), and 2 ranks x b samples train like 1 rank x 2b
samples when the objective draws no randomness. Rank 0 picks the checkpoint to resume from (every rank loads
that one) and alone writes files; the loop does not tear down the process group (see `lmm.dist.cleanup`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from lmm.checkpoint import (
    CorruptFileError,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_file_intact,
    save_checkpoint,
    save_model,
    step_dir_name,
)
from lmm.compiled import compile_network
from lmm.data.prefetch import Prefetcher
from lmm.dist import all_reduce_mean, all_reduce_min, barrier, broadcast_int, init_distributed
from lmm.progress import progress_bar
from lmm.runlog import RunLog

RESUME_IGNORE_KEY = "resume_ignore"
_NO_BAD_STEP = 2**62


class BatchSource(Protocol):
    """batch(step, rank, world, batch_size) -> {key: (batch_size, ...) tensor} in model units; a source may also
    have raw_batch (the same rows in their stored dtypes, e.g. uint8 images), which the loop reads instead, uploads
    and converts on the device (lmm.data.prefetch.Prefetcher)."""

    def batch(self, step: int, rank: int, world: int, batch_size: int) -> dict[str, torch.Tensor]: ...


def derive_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed that is a pure function of (seed, step, rank)."""
    digest = hashlib.sha256(f"lmm-train:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _global_generators(device: torch.device) -> list[torch.Generator]:
    """The default generators the step's randomness comes from: CPU, plus `device`'s own if it is a GPU.
    (Seeding these directly avoids torch.manual_seed's per-call cost of queueing lazy seeds for every backend.)"""
    gens = [torch.default_generator]
    if device.type == "cuda":
        torch.cuda.init()
        gens.append(torch.cuda.default_generators[device.index if device.index is not None else 0])
    return gens


def ema_beta(samples_per_step: int, halflife: float, rampup: float = 0.0, samples_seen: int | None = None) -> float:
    """Per-step EMA decay so that a sample's weight halves every `halflife` samples (0 -> no averaging).

    With rampup > 0 (EDM's ema_rampup_ratio) the halflife is min(halflife, rampup * samples_seen), the
    samples trained on before this step, so the average forgets the initial weights early in training.
    """
    if halflife < 0 or rampup < 0:
        raise ValueError(f"ema_halflife and ema_rampup must be >= 0, got {halflife}, {rampup}")
    if rampup > 0 and samples_seen is not None:
        halflife = min(halflife, rampup * samples_seen)
    return 0.0 if halflife == 0 else 0.5 ** (samples_per_step / halflife)


def warmup_lr(lr: float, step: int, warmup_steps: int) -> float:
    """Learning rate for the 0-based `step`: linear ramp over the first `warmup_steps` steps, then `lr`."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


@torch.no_grad()
def _ema_update(ema: AveragedModel, model: nn.Module, beta: float, first: bool) -> None:
    """ema's weights <- the model's at the `first` update, else lerp(ema, model, 1 - beta); buffers copied; its
    n_averaged counter incremented where it lives. As AveragedModel.update_parameters with an EMA multi_avg_fn,
    bitwise, without its per-step reads of that counter and copies of it to the GPU (host syncs)."""
    averaged = list(ema.module.parameters())
    current = [p.detach() for p in model.parameters()]
    if first:
        torch._foreach_copy_(averaged, current)
    else:
        torch._foreach_lerp_(averaged, current, 1 - beta)
    for b_ema, b in zip(ema.module.buffers(), model.buffers()):
        b_ema.copy_(b)
    ema.n_averaged.add_(1)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def meta_differences(saved: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """Dotted keys whose values differ between two JSON metas, skipping the prefixes in new[RESUME_IGNORE_KEY]. A key
    the saved meta lacks (a setting added to lmm after it was written) does not differ when the new value is its
    default in `defaults` {dotted key: value}."""
    ignore = [RESUME_IGNORE_KEY, *new.get(RESUME_IGNORE_KEY, [])]
    a, b = _flatten(saved), _flatten(new)
    defaults = defaults or {}
    keys = sorted(k for k in a.keys() | b.keys()
                  if not any(k == p or k.startswith(p + ".") for p in ignore) and a.get(k, ...) != b.get(k, ...)
                  and not (k not in a and k in defaults and defaults[k] == b.get(k, ...)))
    return keys


def _json_roundtrip(meta: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(meta))
    except (TypeError, ValueError) as e:
        raise TypeError(f"train(meta=...) must be JSON-serialisable: {e}") from None


@dataclass
class Phase:
    """An optimisation phase that trains a network besides the model (e.g. a discriminator), run after the model's
    own phase at every `interval`-th step from `start` on, with its own Adam(lr, betas) and the loop's clipping.

    loss(net, batch, step, rank, world) -> per-sample loss (B,), computed through `net` (the loop hands it
    the bare network; under torchrun the phase is wrapped in DDP). The network is checkpointed as
    `phase-<name>` and its optimizer with it; it has requires_grad only during its own phase.
    """

    name: str
    net: nn.Module
    loss: Callable[..., torch.Tensor]
    lr: float
    betas: tuple[float, float] = (0.0, 0.99)
    interval: int = 1
    start: int = 0

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.interval == 0


@runtime_checkable
class TrainObjective(Protocol):
    """What the loop calls on an objective (lmm.objectives.Objective implements it; `as_objective` adapts a function).

    objective(model, batch, step) -> per-sample loss (B,) of the model's own phase, B = the per-rank batch size;
    phases() -> the extra optimisation phases (Phase) run after it, fixed for the run; train_state() -> tensors
    it updates besides the networks (e.g. an EMA target), checkpointed as `objective`; load_train_state(state)
    gets them back on resume ({} from a checkpoint without them). An objective that is an nn.Module moves to the
    device with the model.
    """

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor: ...

    def phases(self) -> list[Phase]: ...

    def train_state(self) -> dict[str, torch.Tensor]: ...

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None: ...


class _FunctionObjective:
    """A loss function as a TrainObjective without phases or training state (see `as_objective`)."""

    def __init__(self, fn: Callable[[nn.Module, dict[str, torch.Tensor], int], torch.Tensor]):
        self.fn = fn

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        return self.fn(model, batch, step)

    def phases(self) -> list[Phase]:
        return []

    def train_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"a function objective keeps no training state, got {sorted(state)[:5]}")

    def __repr__(self) -> str:
        return f"as_objective({self.fn!r})"


def as_objective(fn: Callable[[nn.Module, dict[str, torch.Tensor], int], torch.Tensor]) -> TrainObjective:
    """fn(model, batch, step) -> per-sample loss (B,) as a TrainObjective with no phases and no training state;
    an object that already is a TrainObjective comes back as it is."""
    if isinstance(fn, TrainObjective):
        return fn
    if not callable(fn):
        raise TypeError(f"as_objective: expected a loss function fn(model, batch, step), got {type(fn).__name__}")
    return _FunctionObjective(fn)


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """The optimisation and loop settings of one `train` call, validated on construction (ValueError).

    steps: optimizer steps in total (a resumed run continues to it); batch_size: samples per rank and step;
    lr: peak learning rate, reached linearly over `warmup_steps` steps; optimizer "adamw" | "adam" (betas 0.9,
    0.999) with `weight_decay`; grad_clip: max global gradient norm (0: no clipping); ema_halflife: the EMA's
    halflife in samples of the global batch (0: no averaging), at most ema_rampup x samples seen (0: fixed; see
    `ema_beta`); bf16: autocast to bfloat16; seed: the per-step RNG seeds' base (`derive_seed`); a checkpoint
    every `ckpt_every` steps and at the end, the newest `keep` kept; a log record every `log_every` steps and at
    the end; extend: train a finished run on to more steps (its finished model is kept beside the new one, see
    `train`); compile: run the model's network and the networks the objective names (Objective.networks: its
    frozen ones, a discriminator) compiled (lmm.compiled, run.compile); progress: a progress bar on rank 0;
    device: "auto", "cpu", "cuda", "cuda:N" or a torch.device (under torchrun see lmm.dist.init_distributed).
    """

    steps: int
    batch_size: int
    lr: float
    ema_halflife: float
    ema_rampup: float = 0.25
    warmup_steps: int
    grad_clip: float
    bf16: bool
    seed: int
    ckpt_every: int
    log_every: int
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    keep: int = 2
    extend: bool = False
    compile: bool = False
    progress: bool = True
    device: str | torch.device

    def __post_init__(self) -> None:
        for name, value, low in (("steps", self.steps, 0), ("batch_size", self.batch_size, 1),
                                 ("warmup_steps", self.warmup_steps, 0), ("ckpt_every", self.ckpt_every, 1),
                                 ("log_every", self.log_every, 1), ("keep", self.keep, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"train: {name} must be an integer >= {low}, got {value!r}")
        if self.lr < 0 or self.grad_clip < 0:
            raise ValueError(f"train: lr and grad_clip must be >= 0, got lr={self.lr}, grad_clip={self.grad_clip}")
        if self.optimizer not in ("adamw", "adam"):
            raise ValueError(f"train: optimizer must be 'adamw' or 'adam', got {self.optimizer!r}")
        ema_beta(self.batch_size, self.ema_halflife, self.ema_rampup)

    @classmethod
    def from_config(cls, section_train: dict[str, Any], *, seed: int, bf16: bool, device: str | torch.device,
                    progress: bool = True, compile: bool = False) -> TrainSettings:
        """The settings of a `teacher.train` / `student.train` config table (steps, batch_size, lr, ema_halflife,
        ema_rampup, warmup_steps, grad_clip, ckpt_every, log_every; optimizer, weight_decay, keep and extend where
        the table has them, else their defaults) with the run-wide seed, resolved bf16 and compile, device and
        progress."""
        t = section_train
        optional = {k: t[k] for k in ("optimizer", "weight_decay", "keep", "extend") if k in t}
        return cls(steps=t["steps"], batch_size=t["batch_size"], lr=t["lr"], ema_halflife=t["ema_halflife"],
                   ema_rampup=t["ema_rampup"], warmup_steps=t["warmup_steps"], grad_clip=t["grad_clip"],
                   ckpt_every=t["ckpt_every"], log_every=t["log_every"], bf16=bf16, seed=seed, device=device,
                   progress=progress, compile=compile, **optional)


class _Step(nn.Module):
    """forward(batch, step) = loss(net, batch, step, ...): lets DDP see one forward per phase and step while the
    loss gets the bare network (with all its attributes and methods)."""

    def __init__(self, net: nn.Module, loss: Callable[..., torch.Tensor], *extra: int):
        super().__init__()
        self.net = net
        self.__dict__["loss"] = loss
        self.extra = extra

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        return self.loss(self.net, batch, step, *self.extra)


def _load_resume_checkpoint(ckpt: Path) -> tuple[dict, dict, dict]:
    try:
        return load_checkpoint(ckpt)
    except CorruptFileError as err:
        older = list_checkpoints(ckpt.parent.parent)[:-1]
        fallback = f"resume from {older[-1].name}" if older else "start this stage over"
        raise CorruptFileError(f"{err}. Delete {ckpt} to {fallback}") from None


def _phase_step(p: Phase, step_module: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                step: int, dev: torch.device, bf16: bool, grad_clip: float, grads_to_none: bool) -> torch.Tensor:
    """One optimizer step of phase p (its network trainable only meanwhile); returns the detached mean loss."""
    p.net.requires_grad_(True)
    try:
        with torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = step_module(batch, step).float().mean()
        opt.zero_grad(set_to_none=grads_to_none)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_([q for q in p.net.parameters() if q.grad is not None], grad_clip, foreach=True)
        opt.step()
    finally:
        p.net.requires_grad_(False)
    return loss.detach()


def _finished_step(run_dir: Path) -> int | None:
    """The step of run_dir's intact model.safetensors (a finished run), else None."""
    if not model_file_intact(run_dir / "model"):
        return None
    return json.loads((run_dir / "model.json").read_text()).get("step")


def _kept_name(step: int) -> str:
    return f"model-step{step:08d}"


def _check_steps(run_dir: Path, start: int, steps: int, extend: bool, role: str | None) -> int | None:
    """Refuse `steps` that would discard or silently train on a finished run (ValueError naming the setting);
    returns the finished run's step (`_finished_step`)."""
    key = f"{role}.train" if role else "settings"
    finished = _finished_step(run_dir)
    kept = run_dir / f"{_kept_name(steps)}.safetensors"
    if start > steps:
        what = f"holds a finished {finished}-step model" if finished == start else f"has a checkpoint at step {start}"
        also = f" (the {steps}-step model it extended is {kept})" if kept.is_file() else ""
        raise ValueError(f"{run_dir} {what}, beyond {key}.steps={steps}{also}; set {key}.steps={start} or train "
                         f"into another folder (run.dir=...)")
    if finished == start and steps > start and not extend:
        raise ValueError(f"{run_dir} holds a finished {start}-step model; {key}.steps={steps} would train it on and "
                         f"replace it. Set {key}.steps={start} to keep it, {key}.extend=true to train on (the "
                         f"{start}-step model is kept as {_kept_name(start)}.safetensors), or train into another "
                         f"folder (run.dir=...)")
    return finished


def _keep_finished(run_dir: Path, step: int) -> None:
    """Copy the finished model.safetensors + model.json to model-stepNNNNNNNN.* (atomic) before training on."""
    for suffix in (".safetensors", ".json"):
        dst = run_dir / f"{_kept_name(step)}{suffix}"
        tmp = dst.with_name(f".tmp-{dst.name}")
        shutil.copyfile(run_dir / f"model{suffix}", tmp)
        os.replace(tmp, dst)


def train(model: nn.Module, objective: TrainObjective, source: BatchSource, settings: TrainSettings, *,
          run_dir: str | Path, meta: dict[str, Any], resume_defaults: dict[str, Any] | None = None,
          check_only: bool = False) -> nn.Module:
    """Train `model` in place up to settings.steps optimizer steps in total, resuming from run_dir's latest checkpoint.

    Each step: batch = source.batch(step, rank, world, B) (B = settings.batch_size per rank), the step's loss is
    the mean of objective(model, batch, step) (shape (B,)), then the objective's phases run (see Phase). The EMA
    (torch.optim.swa_utils.AveragedModel, first set to the weights after step 1) follows `ema_beta`. A checkpoint
    (model, EMA, phase networks, optimizers, objective.train_state()) resumes only with the world size and B it
    was written with, and with `meta` (JSON) equal to its own but for meta["resume_ignore"] prefixes and keys it
    lacks that hold their value in resume_defaults {dotted key: default} (see `meta_differences`).

    Returns the EMA model (the model's dtype, eval mode). Rank 0 also writes run_dir/log.jsonl (its records also
    as TensorBoard scalars where tensorboard is installed, see lmm.runlog) and run_dir/model.safetensors +
    model.json (meta plus "step"; left as they are when a finished run is called again, so that files made from
    the model stay valid, unless missing, damaged or disagreeing with each other: then
    rewritten from the final checkpoint). Raises FloatingPointError on a non-finite loss (no checkpoint is
    written for or after that step).

    A finished run (model.safetensors at its latest checkpoint's step) is trained on to more steps only with
    settings.extend, which first copies its model to model-stepNNNNNNNN.safetensors + .json; fewer steps than
    a checkpoint's are refused. check_only: run every check against run_dir (ValueError), write nothing, return
    the model untrained.
    """
    if not isinstance(settings, TrainSettings):
        raise TypeError(f"train: settings must be a TrainSettings, got {type(settings).__name__}")
    if not isinstance(objective, TrainObjective):
        raise TypeError(f"train: the objective must implement lmm.train.TrainObjective (__call__, phases, train_state, "
                        f"load_train_state), got {type(objective).__name__}; wrap a loss function in as_objective(fn)")
    steps, batch_size, lr, seed, bf16 = settings.steps, settings.batch_size, settings.lr, settings.seed, settings.bf16
    ema_halflife, ema_rampup, grad_clip = settings.ema_halflife, settings.ema_rampup, settings.grad_clip
    rank, world, _, dev = init_distributed(settings.device)
    main = rank == 0
    run_dir = Path(run_dir)
    meta = _json_roundtrip(meta)

    model.to(dev)
    if isinstance(objective, nn.Module):
        objective.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=lr, betas=(0.9, 0.999), weight_decay=settings.weight_decay)
    ema = AveragedModel(model).requires_grad_(False).eval()
    phases: list[Phase] = list(objective.phases())
    if len({p.name for p in phases}) != len(phases):
        raise ValueError(f"train: phase names must be unique, got {[p.name for p in phases]}")
    phase_opts = {p.name: torch.optim.Adam([q for q in p.net.parameters() if q.requires_grad], lr=p.lr,
                                           betas=p.betas) for p in phases}

    start, finished = 0, None
    latest = latest_checkpoint(run_dir) if main else None
    resume_step = broadcast_int(-1 if latest is None else checkpoint_step(latest))
    ckpt = None if resume_step < 0 else run_dir / "checkpoints" / step_dir_name(resume_step)
    if ckpt is not None:
        tensors, state, saved_meta = _load_resume_checkpoint(ckpt)
        differing = meta_differences(saved_meta, meta, resume_defaults)
        if differing:
            flat_old, flat_new = _flatten(saved_meta), _flatten(meta)
            changes = "; ".join(f"{k.removeprefix('config.')}: {flat_old.get(k, '<absent>')!r} -> {flat_new.get(k, '<absent>')!r}"
                                for k in differing[:8])
            more = f" (and {len(differing) - 8} more)" if len(differing) > 8 else ""
            raise ValueError(f"cannot resume {run_dir}: it was trained with other settings ({changes}{more}). Set "
                             f"them back to resume it, or train into another folder (run.dir=...)")
        start = int(state["step"])
        if (state.get("world"), state.get("batch_size")) != (world, batch_size):
            raise ValueError(f"cannot resume from {ckpt}: it was trained by {state.get('world')} process(es) x "
                             f"batch {state.get('batch_size')} per process, this run has {world} x {batch_size}; "
                             "the data stream, per-process randomness and EMA would differ. Resume with the same "
                             "torchrun --nproc_per_node and batch size, or use another run folder")
        finished = _check_steps(run_dir, start, steps, settings.extend, meta.get("role"))
        model.load_state_dict(tensors["model"])
        ema.load_state_dict(tensors["ema"])
        opt.load_state_dict(state["optimizer"])
        for p in phases:
            p.net.load_state_dict(tensors[f"phase-{p.name}"])
            phase_opts[p.name].load_state_dict(state["phase_optimizers"][p.name])
        objective.load_train_state(tensors.get("objective", {}))
    if check_only:
        return model
    if main and ckpt is not None and start < steps and finished == start:
        _keep_finished(run_dir, start)

    def wrap(step_module: nn.Module) -> nn.Module:
        if world == 1:
            return step_module
        for q in step_module.parameters():
            if q.requires_grad and q.grad is None:
                q.grad = torch.zeros_like(q)
        return DistributedDataParallel(step_module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                       gradient_as_bucket_view=True)

    # Under DDP the gradients are views of its buckets from the start and are zeroed, not dropped, so no step copies
    # them into the buckets or finds their strides differ (as a 1x1 convolution's weight gradient's do on the CPU).
    grads_to_none = world == 1
    step_module = wrap(_Step(model, objective))
    phase_steps = {p.name: wrap(_Step(p.net, p.loss, rank, world)) for p in phases}
    for p in phases:
        p.net.requires_grad_(False)
    if settings.compile:
        for net in [model, *getattr(objective, "networks", list)()]:
            compile_network(net)

    samples_per_step = batch_size * world
    loader = Prefetcher(source, rank, world, batch_size, dev)
    generators = _global_generators(dev)
    log = RunLog(run_dir / "log.jsonl", resumed_from=start)

    pbar = progress_bar(steps, initial=start, enabled=settings.progress and main, desc=f"train {run_dir.name}",
                        dynamic_ncols=True)
    losses: list[torch.Tensor] = []
    phase_losses: dict[str, list[torch.Tensor]] = {}
    norms: list[torch.Tensor] = []
    loss_sum, loss_count = 0.0, 0
    norm_sum, norm_count = 0.0, 0
    t_begin = window_t = time.perf_counter()
    window_steps = 0
    first_step_s: float | None = None
    model.train()
    for step in range(start, steps):
        step_seed = derive_seed(seed, step, rank)
        for gen in generators:
            gen.manual_seed(step_seed)
        batch = loader.batch(step, step + 1 if step + 1 < steps else None)
        lr_now = warmup_lr(lr, step, settings.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr_now
        with torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            per_sample = step_module(batch, step)
        if per_sample.shape != (batch_size,):
            raise ValueError(f"objective must return a per-sample loss of shape ({batch_size},), "
                             f"got {tuple(per_sample.shape)}")
        loss = per_sample.float().mean()
        opt.zero_grad(set_to_none=grads_to_none)
        loss.backward()
        if grad_clip > 0:
            norms.append(nn.utils.clip_grad_norm_(params, grad_clip, foreach=True))
        opt.step()
        _ema_update(ema, model, ema_beta(samples_per_step, ema_halflife, ema_rampup, step * samples_per_step),
                    first=step == 0)
        losses.append(loss.detach())
        for p in phases:
            if p.due(step):
                phase_losses.setdefault(p.name, []).append(
                    _phase_step(p, phase_steps[p.name], phase_opts[p.name], batch, step, dev, bf16, grad_clip,
                                grads_to_none))
        window_steps += 1
        pbar.update(1)
        if step == start:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            window_t, window_steps = time.perf_counter(), 0
            first_step_s = window_t - t_begin

        done = step + 1
        do_log = done % settings.log_every == 0 or done == steps
        do_ckpt = done % settings.ckpt_every == 0 or done == steps
        if not (do_log or do_ckpt):
            continue
        values = torch.stack(losses)
        first = done - len(losses) + 1
        step_numbers = torch.arange(first, done + 1, device=values.device)
        finite = torch.isfinite(values)
        for name, vals in phase_losses.items():
            finite = finite & torch.isfinite(torch.stack(vals).sum())
        bad = torch.where(finite, _NO_BAD_STEP, step_numbers).min()
        bad_step = int(all_reduce_min(bad).item())
        if bad_step != _NO_BAD_STEP:
            pbar.close()
            good = latest_checkpoint(run_dir)
            if main:
                log.append({"step": bad_step, "event": "non-finite loss", "checkpoint": str(good)})
                log.close()
            loader.close()
            barrier()
            raise FloatingPointError(f"non-finite loss at step {bad_step}; last good checkpoint: "
                                     f"{good if good is not None else 'none (no checkpoint written yet)'}")
        loss_sum += float(all_reduce_mean(values.sum()).item())
        loss_count += len(losses)
        if norms:
            norm_sum += float(torch.stack(norms).sum().item())
            norm_count += len(norms)
        losses.clear()
        norms.clear()
        if do_log:
            now = time.perf_counter()
            rate_steps, rate_s = (window_steps, now - window_t) if window_steps else (1, first_step_s)
            record = {"step": done, "loss": loss_sum / loss_count, "lr": lr_now,
                      "samples_per_s": rate_steps * samples_per_step / max(rate_s, 1e-9), "time": now - t_begin}
            if first_step_s is not None:
                record.update(first_step_s=first_step_s, compile=settings.compile)
                first_step_s = None
            if norm_count:
                record["grad_norm"] = norm_sum / norm_count
            for name, vals in phase_losses.items():
                record[f"{name}_loss"] = float(all_reduce_mean(torch.stack(vals).mean()).item())
            phase_losses.clear()
            if main:
                log.append(record)
                pbar.set_postfix(loss=f"{record['loss']:.4g}", samples_s=f"{record['samples_per_s']:.0f}")
            loss_sum, loss_count, norm_sum, norm_count = 0.0, 0, 0.0, 0
        if do_ckpt and main:
            log.flush()
            tensors = {"model": model.state_dict(), "ema": ema.state_dict(),
                       **{f"phase-{p.name}": p.net.state_dict() for p in phases}}
            objective_state = objective.train_state()
            if objective_state:
                tensors["objective"] = objective_state
            save_checkpoint(run_dir, done, tensors,
                            {"optimizer": opt.state_dict(), "step": done, "seed": seed, "world": world,
                             "batch_size": batch_size,
                             "phase_optimizers": {name: o.state_dict() for name, o in phase_opts.items()}},
                            meta, keep=settings.keep)
        window_t, window_steps = time.perf_counter(), 0
    pbar.close()
    log.close()
    loader.close()

    if main and (start < steps or not model_file_intact(run_dir / "model")):
        if start == steps and (run_dir / "model.safetensors").is_file():
            print(f"{run_dir / 'model.safetensors'}: damaged or cut short; rewritten from {ckpt}", file=sys.stderr)
        save_model(run_dir / "model", ema.module.state_dict(), {**meta, "step": steps})
    barrier()
    return ema.module

"""Build teachers and students from a run config, and load them back from `model.safetensors` + `model.json`.

A model file records everything needed to rebuild it without this run's config: the raw network's
config, the objective (which fixes the preconditioning), data shape, classes and, for teachers, the ODE.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmm.checkpoint import load_model_file
from lmm.config import defaults, flat_keys
from lmm.nets import build_net
from lmm.objectives import STUDENT_OBJECTIVES, Objective, get_objective
from lmm.teachers import TEACHERS, Teacher, build_teacher, folder_teacher
from lmm.train import RESUME_IGNORE_KEY

# Config keys that may change between a run and its resumption: how long and how verbosely to train,
# where things are, and the settings of the other stages.
_RESUME_FREE = ["config.run.dir", "config.run.device", "config.run.deterministic", "config.run.progress", "config.eval",
                "config.data.root", "config.run.compile"]
_RESUME_FREE_TRAIN = ["steps", "ckpt_every", "log_every", "extend"]
_OTHER_STAGES = {"teacher": ["config.pairs", "config.student", "config.teacher.solver", "config.teacher.steps",
                             "config.teacher.schedule", "teacher.solver", "teacher.steps", "teacher.schedule"],
                 "student": ["config.teacher", "config.pairs", "pairs.path"]}


def teacher_objective(tcfg: dict) -> Objective:
    """The objective that trains a teacher of config section `teacher` (its kind's `training_objective`)."""
    cls = TEACHERS.get(tcfg["kind"])
    if not cls.trainable:
        raise ValueError(f"teacher.kind={tcfg['kind']}: such teachers are loaded from their folders (--teacher / "
                         "--model FOLDER), not trained by lmm")
    return cls.training_objective(tcfg)


def student_objective_class(name: str) -> type[Objective]:
    """The class of student objective `name` (`student.objective`, a key of lmm.objectives.STUDENT_OBJECTIVES)."""
    return STUDENT_OBJECTIVES.get(name)


def student_objective(scfg: dict, tcfg: dict | None) -> Objective:
    """The objective `student.objective` of config section `student`, for the teacher described by `tcfg` (its
    `teacher` config section; None when there is none)."""
    return student_objective_class(scfg["objective"]).from_config(scfg, tcfg)


def resume_defaults(objective: Objective) -> dict[str, Any]:
    """{dotted model-meta key: default} of every config key and objective argument, so that checkpoints written
    before a setting existed still resume when it has its default (lmm.train.meta_differences)."""
    params = inspect.signature(type(objective).__init__).parameters.values()
    return {**{f"config.{k}": v for k, v in flat_keys(defaults())},
            **{f"objective_kwargs.{p.name}": p.default for p in params
               if p.name != "self" and p.default is not inspect.Parameter.empty}}


def teacher_ode_kwargs(tcfg: dict) -> dict[str, Any]:
    """The keys of config section `teacher` that its kind's ODE takes (Teacher.ode_keys), with their values."""
    return {k: tcfg[k] for k in TEACHERS.get(tcfg["kind"]).ode_keys}


def model_meta(role: str, objective: Objective, net_cfg: dict, data_shape: tuple[int, ...],
               num_classes: int, cfg: dict, bf16: bool) -> dict[str, Any]:
    """The JSON that travels with a model file (see module docstring); `bf16`: whether it trained under bf16
    autocast (run.bf16 resolved on this machine)."""
    meta: dict[str, Any] = {
        "format": "lmm-model/1",
        "role": role,
        "bf16": bf16,
        "objective": objective.name,
        "objective_kwargs": objective.config(),
        "net": net_cfg,
        "data_shape": list(data_shape),
        "num_classes": num_classes,
        "config": cfg,
        RESUME_IGNORE_KEY: _RESUME_FREE + _OTHER_STAGES[role]
        + [f"config.{role}.train.{k}" for k in _RESUME_FREE_TRAIN],
    }
    if role == "teacher":
        t = cfg["teacher"]
        meta["teacher"] = {"kind": t["kind"], "solver": t["solver"], "steps": t["steps"], "schedule": t["schedule"],
                           **teacher_ode_kwargs(t)}
    return meta


def build_model(objective: Objective, net_cfg: dict, data_shape: tuple[int, ...], num_classes: int,
                seed: int | None = None) -> nn.Module:
    """The objective's model around the net of `net_cfg`, its initial weights drawn from `seed` (the global RNG
    when None; the RNG's state is left as it was); its `sampler` attribute names the few-step sampler mode of the
    models the objective trains (lmm.sampling.sample_lines: "line", or "restart" for consistency models)."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = objective.build_model(build_net(net_cfg, tuple(data_shape), num_classes))
    model.sampler = objective.sampler
    return model


def model_path(path: str | Path) -> Path:
    """What a model given as `X.safetensors`, `X.json`, `X` or a run folder is stored in: `X.safetensors` (a folder's
    `model.safetensors`), or a diffusers folder itself; its sha256 (lmm.io.path_sha256) identifies the model."""
    path = Path(path)
    if path.is_dir():
        return path if folder_teacher(path) else path / "model.safetensors"
    if path.suffix not in ("", ".safetensors", ".json"):
        raise ValueError(f"{path} is not an lmm model: give X.safetensors (with X.json beside it), a run folder "
                         "holding model.safetensors, or a diffusers model folder")
    return path.with_suffix(".safetensors")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module | Teacher, dict]:
    """Rebuild the model saved at `path` (`X.safetensors`, its `X.json` beside it, or a run folder), or load a
    folder in a teacher kind's own format as that teacher (lmm.teachers.folder_teacher: a diffusers model folder,
    extra `lmm[diffusers]`), its weights on `device` ("cpu", "cuda", "cuda:N" or a torch.device).

    Returns (Teacher, meta) for a teacher file and (LinesModel, meta) for a student file, in eval mode without
    gradients; meta is the file's model.json (its "config", "data_shape", "num_classes", ...). A student is called
    model(x_t (B, *data_shape) float, t (B,) float in [0, 1], y (B,) int64 labels or None) -> x1_hat
    (B, *data_shape), and has attributes data_shape (e.g. (C, H, W)), num_classes (0: unconditional) and sampler
    (its few-step mode, "line" or "restart"); lmm.generate.sample draws images from either kind.
    """
    path = model_path(path)
    if path.is_dir():
        return folder_teacher(path).load_folder(path, device)
    state, meta = load_model_file(path)
    if meta.get("format") != "lmm-model/1":
        raise ValueError(f"{path}: not an lmm model file (meta 'format' is {meta.get('format')!r})")
    objective = get_objective(meta["objective"], **meta["objective_kwargs"])
    model = build_model(objective, meta["net"], tuple(meta["data_shape"]), meta["num_classes"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the network in its meta "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.to(device).eval().requires_grad_(False)
    if meta["role"] == "teacher":
        t = dict(meta["teacher"])
        kind = t.pop("kind")
        return build_teacher(kind, model, **{k: t[k] for k in TEACHERS.get(kind).ode_keys if k in t}), meta
    return model, meta

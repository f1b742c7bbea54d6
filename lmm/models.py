"""Build teachers and students from a run config, and load them back from `model.safetensors` + `model.json`.

A model file records everything needed to rebuild it without this run's config: the raw network's
config, the objective (which fixes the preconditioning), data shape, classes and, for teachers, the ODE.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmm.checkpoint import load_model_file
from lmm.nets import build_net
from lmm.objectives import Objective, get_objective
from lmm.teachers import TEACHER_OBJECTIVES, TEACHERS, Teacher, build_teacher
from lmm.teachers.diffusers import is_diffusers_folder, load_diffusers_teacher
from lmm.train import RESUME_IGNORE_KEY

EDM_KEYS = ("sigma_min", "sigma_max", "rho")
# Config keys that may change between a run and its resumption: how long and how verbosely to train,
# where things are, and the settings of the other stages.
_RESUME_FREE = ["config.run.dir", "config.run.device", "config.run.progress", "config.eval", "config.data.root"]
_RESUME_FREE_TRAIN = ["steps", "ckpt_every", "log_every"]
_OTHER_STAGES = {"teacher": ["config.pairs", "config.student", "config.teacher.solver", "config.teacher.steps",
                             "config.teacher.schedule", "teacher.solver", "teacher.steps", "teacher.schedule"],
                 "student": ["config.teacher", "config.pairs", "pairs.path"]}


def teacher_objective(tcfg: dict) -> Objective:
    kind = tcfg["kind"]
    if kind not in TEACHER_OBJECTIVES:
        raise ValueError(f"teacher.kind: unknown '{kind}'; valid: {', '.join(TEACHER_OBJECTIVES)}")
    if kind == "edm":
        return get_objective("edm", sigma_data=tcfg["sigma_data"], P_mean=tcfg["P_mean"], P_std=tcfg["P_std"],
                             denoiser=tcfg["denoiser"])
    return get_objective("flow_matching")


STUDENT_PRECONDS = ("teacher", "lines", "none")


def student_objective(scfg: dict, tcfg: dict) -> Objective:
    """The lines objective of config section `student`; student.precond = "teacher" takes the parameterisation
    of the teacher described by `tcfg` (its `teacher` config section: kind, sigma_max, sigma_data)."""
    precond, sigma_data, sigma_max = scfg["precond"], scfg["sigma_data"], tcfg["sigma_max"]
    if precond not in STUDENT_PRECONDS:
        raise ValueError(f"student.precond: unknown {precond!r}; valid: {', '.join(STUDENT_PRECONDS)}")
    if precond == "teacher":
        if tcfg["kind"] not in TEACHERS:
            raise ValueError(f"teacher.kind: unknown '{tcfg['kind']}'; valid: {', '.join(TEACHERS)}")
        precond = TEACHERS[tcfg["kind"]].line_precond
        sigma_data = tcfg["sigma_data"] if precond == "edm" else sigma_data
    return get_objective(
        "lines",
        denoiser=tcfg.get("denoiser", "edm"),
        loss=scfg["loss"],
        loss_options={k: scfg[k] for k in scfg["loss"] if isinstance(scfg.get(k), dict)},
        time_sampling=scfg["time_sampling"],
        grid=tuple(scfg["grid"]),
        weighting=scfg["weighting"],
        logit_mean=scfg["logit_mean"],
        logit_std=scfg["logit_std"],
        sigma_data=sigma_data,
        precond=precond,
        sigma_max=sigma_max,
    )


def teacher_ode_kwargs(tcfg: dict) -> dict[str, Any]:
    return {k: tcfg[k] for k in EDM_KEYS} if tcfg["kind"] == "edm" else {}


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


def build_model(objective: Objective, net_cfg: dict, data_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return objective.build_model(build_net(net_cfg, tuple(data_shape), num_classes))


def model_path(path: str | Path) -> Path:
    """What a model given as `X.safetensors`, `X.json`, `X` or a run folder is stored in: `X.safetensors` (a folder's
    `model.safetensors`), or a diffusers folder itself; its sha256 (lmm.io.path_sha256) identifies the model."""
    path = Path(path)
    if path.is_dir():
        return path if is_diffusers_folder(path) else path / "model.safetensors"
    return path.with_suffix(".safetensors")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module | Teacher, dict]:
    """Rebuild the model saved at `path` (`X.safetensors`, its `X.json` beside it, or a run folder), or load a
    diffusers model folder as a teacher (lmm.teachers.diffusers.load_diffusers_teacher; extra `lmm[diffusers]`).

    Returns (Teacher, meta) for a teacher file and (LinesModel, meta) for a student file, in eval mode.
    """
    path = model_path(path)
    if path.is_dir():
        return load_diffusers_teacher(path, device)
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
        return build_teacher(t.pop("kind"), model, **{k: t[k] for k in EDM_KEYS if k in t}), meta
    return model, meta

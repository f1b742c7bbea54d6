"""The three training stages as functions of one run config: teacher -> pairs -> student.

Each stage reads what the previous one wrote under `run.dir` (or an explicit path) and writes its own
folder there; each is safe to rerun (training and pair generation resume where they stopped). Sampling and
evaluation, the stages after these: lmm.generate, lmm.evaluate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from lmm import dist
from lmm.compiled import compile_network, pad_rows
from lmm.data.from_config import load_data, num_classes, real_source
from lmm.generate import bf16_autocast
from lmm.io import path_sha256
from lmm.models import (
    build_model,
    load_model,
    model_meta,
    model_path,
    resume_defaults,
    student_objective,
    student_objective_class,
    teacher_objective,
)
from lmm.pairs import MANIFEST, PairSource, make_pairs
from lmm.runs import run_dir, use_bf16, use_compile
from lmm.solvers import expected_nfe
from lmm.teachers import Teacher
from lmm.teachers.base import sample_teacher
from lmm.train import TrainSettings, train


def _train_settings(cfg: dict, section: dict, device: torch.device) -> TrainSettings:
    """The TrainSettings of config section `section` (teacher or student) with run.seed, run.bf16, run.compile,
    run.progress."""
    return TrainSettings.from_config(section["train"], seed=cfg["run"]["seed"], bf16=use_bf16(cfg, device),
                                     compile=use_compile(cfg, device), device=device, progress=cfg["run"]["progress"])


def train_teacher(cfg: dict, check_only: bool = False) -> Path:
    """Train the teacher on the dataset; returns the path of its `model.safetensors`. check_only: refuse
    (ValueError) what training would refuse, write nothing."""
    _, _, _, device = dist.init_distributed(cfg["run"]["device"], cfg["run"]["deterministic"])
    data = load_data(cfg)
    ncls = num_classes(cfg, data)
    objective = teacher_objective(cfg["teacher"])
    model = build_model(objective, cfg["teacher"]["net"], data.data_shape, ncls, seed=cfg["run"]["seed"])
    out = run_dir(cfg) / "teacher"
    settings = _train_settings(cfg, cfg["teacher"], device)
    meta = model_meta("teacher", objective, cfg["teacher"]["net"], data.data_shape, ncls, cfg, settings.bf16)
    train(model, objective, data.source(cfg["run"]["seed"], labels=ncls > 0), settings, run_dir=out, meta=meta,
          check_only=check_only)
    dist.barrier()
    return out / "model.safetensors"


def teacher_sampler(teacher: Teacher, solver: str, steps: int, bf16: bool, schedule: str = "edm",
                    compile: bool = False, batch_size: int = 0
                    ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """generate(z, y) -> x1 with the teacher's deterministic ODE solver: noise z (B, *data_shape) and labels y (B,)
    or None, on any device, to float32 endpoints x1 (B, *data_shape) on the teacher's device. compile: the
    teacher's network runs compiled (lmm.compiled, in place), a batch of fewer than `batch_size` rows padded with
    zero noise to it and the padding's endpoints dropped."""
    device = next(teacher.parameters()).device
    if compile:
        compile_network(teacher.model)

    def generate(z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        b = z.shape[0]
        n = max(b, batch_size) if compile else b
        z, y = pad_rows(z.to(device), n), pad_rows(None if y is None else y.to(device), n)
        with torch.no_grad(), bf16_autocast(device, bf16):
            return sample_teacher(teacher, z, steps, solver, y, schedule=schedule).x[:b].float()

    return generate


def generate_pairs(cfg: dict, teacher_path: str | Path | None = None, store: str | Path | None = None,
                   check_only: bool = False) -> Path:
    """Run the teacher's ODE solver on seeded noise and write a sharded pair store. check_only: refuse
    (ValueError) what generation would refuse, write nothing."""
    rank, world, _, device = dist.init_distributed(cfg["run"]["device"], cfg["run"]["deterministic"])
    out = Path(store or run_dir(cfg) / "pairs")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; a pair store is a folder: name a new or existing store folder")
    teacher_path = model_path(teacher_path or run_dir(cfg) / "teacher")
    teacher, tmeta = load_model(teacher_path, device)
    if not isinstance(teacher, Teacher):
        raise ValueError(f"{teacher_path}: is a student model, not a teacher")
    t = cfg["teacher"]
    grid = teacher.grid(t["steps"], t["schedule"])
    bf16 = use_bf16(cfg, device)
    meta = {
        "teacher": {"sha256": path_sha256(teacher_path), "path": str(teacher_path), "kind": tmeta["teacher"]["kind"],
                    "config": tmeta["config"]["teacher"]},
        "solver": t["solver"], "steps": t["steps"], "schedule": t["schedule"], "grid": [float(g) for g in grid],
        "bf16": bf16, "nfe": expected_nfe(t["solver"], t["steps"], teacher.singular_end),
    }
    p = cfg["pairs"]
    generate = teacher_sampler(teacher, t["solver"], t["steps"], bf16, t["schedule"],
                               compile=use_compile(cfg, device), batch_size=p["batch_size"])
    make_pairs(out, generate, n_pairs=p["n"],
               shard_size=p["shard_size"], data_shape=tuple(tmeta["data_shape"]), num_classes=tmeta["num_classes"],
               seed=p["seed"], meta=meta, batch_size=p["batch_size"], rank=rank, world=world, dtype=p["dtype"],
               progress=cfg["run"]["progress"], device=device, repair=p["repair"], check_only=check_only)
    dist.barrier()
    return out


def train_student(cfg: dict, store: str | Path | None = None, teacher_path: str | Path | None = None,
                  check_only: bool = False) -> Path:
    """Train the student of `student.objective`: "lines" (LMM) and "reflow" on a pair store (`store`, default
    RUN/pairs), "ot_cfm" and "consistency" on the dataset (data.*); the teacher (student.init = teacher, and
    consistency distillation's) is the pair store's, found by its sha256, or `teacher_path` / RUN/teacher.
    Returns the path of the student's `model.safetensors`. check_only: refuse (ValueError) what training would
    refuse, write nothing."""
    _, _, _, device = dist.init_distributed(cfg["run"]["device"], cfg["run"]["deterministic"])
    s, run, seed = cfg["student"], run_dir(cfg), cfg["run"]["seed"]
    if s["init"] not in ("teacher", "scratch"):
        raise ValueError(f"student.init: unknown '{s['init']}'; valid: teacher, scratch")
    kind = student_objective_class(s["objective"])
    wants_teacher = s["init"] == "teacher" or kind.needs_teacher
    if kind.source == "pairs":
        store = Path(store or run / "pairs")
        source: Any = PairSource(store, seed=seed, window=s["window"], verify=False)
        if not check_only:
            dist.once_per_node(source.store.verify)
        manifest = source.store.manifest
        shape, ncls = tuple(manifest["data_shape"]), manifest["num_classes"]
        trained_on = {"pairs": {"path": str(store), "teacher_sha256": manifest["teacher"]["sha256"],
                                "n": manifest["n_pairs"]}}
        tpath = store_teacher(manifest, teacher_path, run) if wants_teacher else None
    else:
        data = load_data(cfg)
        shape, ncls = data.data_shape, num_classes(cfg, data)
        source = data.source(seed, labels=ncls > 0)
        trained_on = {"data": {"name": data.name, "n": len(data)}}
        tpath = model_path(teacher_path or run / "teacher") if wants_teacher else None
        if tpath is not None and not tpath.exists():
            why = "student.init=teacher" if s["init"] == "teacher" and not kind.needs_teacher else \
                f"student.objective={s['objective']}"
            raise FileNotFoundError(f"{why} needs a teacher, and there is none at {teacher_path or run / 'teacher'}: "
                                    f"train one (lmm teacher "
                                    f"train), pass --teacher FILE{', or set student.init=scratch' if not kind.needs_teacher else ''}")
        if tpath is not None:
            trained_on["teacher_sha256"] = path_sha256(tpath)
    teacher, tmeta = load_model(tpath) if tpath is not None else (None, None)
    if tmeta is not None and (tuple(tmeta["data_shape"]), tmeta["num_classes"]) != (tuple(shape), ncls):
        raise ValueError(f"{tpath}: the teacher's data ({tuple(tmeta['data_shape'])}, {tmeta['num_classes']} classes) "
                         f"is not the student's ({tuple(shape)}, {ncls} classes)")
    tcfg = manifest["teacher"]["config"] if kind.source == "pairs" else None if tmeta is None else tmeta["config"]["teacher"]
    objective = student_objective(s, tcfg)
    model = build_model(objective, s["net"], shape, ncls, seed=seed)
    if s["init"] == "teacher":
        _init_from_teacher(model, teacher, tmeta, tpath, s["net"])
    objective.setup(shape, ncls, reals=real_source(cfg, shape, ncls) if "adversarial" in getattr(objective, "loss", {})
                    else None, teacher=teacher if kind.needs_teacher else None, model=model)
    del teacher
    settings = _train_settings(cfg, s, device)
    meta = model_meta("student", objective, s["net"], shape, ncls, cfg, settings.bf16)
    meta.update(trained_on)
    out = run / "student"
    train(model, objective, source, settings, run_dir=out, meta=meta, resume_defaults=resume_defaults(objective),
          check_only=check_only)
    dist.barrier()
    return out / "model.safetensors"


def check_stages(cfg: dict) -> None:
    """Run the checks of each stage that has begun in RUN (teacher, pairs, student) against `cfg`, writing nothing:
    a config that a later stage would refuse is refused before an earlier one records anything."""
    run = run_dir(cfg)
    if (run / "teacher" / "checkpoints").is_dir():
        train_teacher(cfg, check_only=True)
    if (run / "pairs" / MANIFEST).is_file() and (run / "teacher" / "model.safetensors").is_file():
        generate_pairs(cfg, check_only=True)
    if (run / "student" / "checkpoints").is_dir():
        train_student(cfg, check_only=True)


def store_teacher(manifest: dict, teacher_path: str | Path | None, run: Path) -> Path:
    """The teacher file (or diffusers folder) that made a pair store, found by its sha256 (lmm.io.path_sha256):
    `teacher_path` if given, else RUN/teacher, else the path the store recorded. Raises ValueError when the one
    found is another teacher."""
    want = manifest["teacher"]["sha256"]
    recorded = manifest["teacher"].get("path")
    candidates = [model_path(teacher_path)] if teacher_path else [run / "teacher" / "model.safetensors",
                                                             *([Path(recorded)] if recorded else [])]
    found = [p for p in candidates if p.is_file() or p.is_dir()]
    for path in found:
        if path_sha256(path) == want:
            return path
    if not found:
        raise FileNotFoundError(f"the pair store's teacher (sha256 {want[:12]}...) is not at "
                                f"{' or '.join(map(str, candidates))}; pass --teacher FILE, or set student.init=scratch")
    raise ValueError(f"{found[0]} is not the teacher that made the pair store (sha256 {path_sha256(found[0])[:12]}... "
                     f"!= {want[:12]}...); pass --teacher with the right file, or set student.init=scratch")


def _init_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module | Teacher, tmeta: dict, teacher_path: Path,
                       net_cfg: dict) -> None:
    if tmeta["net"] != net_cfg:
        raise ValueError(f"student.init=teacher needs the student's net config to equal the teacher's "
                         f"({teacher_path}: {tmeta['net']}); set student.init=scratch or copy the net table")
    if isinstance(teacher, Teacher) and getattr(student, "precond", None) == "velocity" != teacher.line_precond:
        raise ValueError(f"student.init=teacher: {teacher_path} is a '{teacher.kind}' teacher whose net is not a "
                         "velocity field, which this student's model is; set student.init=scratch")
    net = teacher.model.net if isinstance(teacher, Teacher) else teacher.net
    student.net.load_state_dict(net.state_dict())

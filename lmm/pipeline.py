"""The pipeline's stages as functions of one run config: teacher -> pairs -> student -> samples -> metrics.

Each stage reads what the previous one wrote under `run.dir` (or an explicit path) and writes its own
folder there; each is safe to rerun (training and pair generation resume where they stopped).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lmm import dist
from lmm.data.arrays import ImageData, TensorSource
from lmm.data.datasets import load_dataset
from lmm.data.images import save_image_grid, to_uint8
from lmm.io import atomic_path, path_sha256, save_json
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
from lmm.pairs import PairSource, make_pairs
from lmm.progress import progress_bar
from lmm.sampling import default_grid, sample_lines
from lmm.solvers import expected_nfe
from lmm.teachers import Teacher
from lmm.teachers.base import sample_teacher
from lmm.train import TrainSettings, train


def run_dir(cfg: dict) -> Path:
    return Path(cfg["run"]["dir"])


# The config keys each stage's output depends on; record_config updates only these in RUN/config.json.
STAGE_KEYS = {
    "teacher": ["run", "data", "teacher"],
    "pairs": ["pairs", "teacher.solver", "teacher.steps", "teacher.schedule"],
    "student": ["student"],
    "eval": ["eval"],
}


def record_config(cfg: dict, stage: str) -> None:
    """Update RUN/config.json with the keys `stage` used (STAGE_KEYS), after it has succeeded, so that a refused
    or failed stage leaves the record as it was and the file always describes the models in the folder. The
    first stage to write it records the whole config."""
    if not dist.is_main():
        return
    path = run_dir(cfg) / "config.json"
    record = json.loads(path.read_text()) if path.is_file() else json.loads(json.dumps(cfg))
    keys = STAGE_KEYS[stage]
    if stage == "teacher":
        keys = ["run", "data", *(f"teacher.{k}" for k in cfg["teacher"] if f"teacher.{k}" not in STAGE_KEYS["pairs"])]
    for key in keys:
        *parents, last = key.split(".")
        src, dst = cfg, record
        for part in parents:
            src, dst = src[part], dst.setdefault(part, {})
        dst[last] = src[last]
    save_json(path, record)


_SPLIT_DATASETS = ("fashion_mnist", "cifar10", "imagenet64", "afhq")
_FOLDER_DATASETS = ("image_folder", "afhq")


def load_data(cfg: dict) -> ImageData:
    """The dataset of cfg["data"] as stored (uint8 images are converted per batch by `ImageData.source`), cut to
    its first data.n samples (views) when data.n > 0; refused when data.resolution / data.channels (when set)
    differ from the dataset's own."""
    d = cfg["data"]
    name = d["name"]
    kw: dict[str, Any] = {"split": d["split"]} if name in _SPLIT_DATASETS else {}
    if not kw and d["split"] != "train":
        raise ValueError(f"data.split / eval.split = {d['split']!r}: dataset '{name}' has only one split ('train')")
    if name == "toy":
        kw = {"kind": d["toy"], "n": d["n"] or 20_000, "seed": cfg["run"]["seed"]}
    elif name in _FOLDER_DATASETS:
        kw.update(resolution=d["resolution"], channels=d["channels"] or 3, labels=d["conditional"])
    data = load_dataset(name, root=d["root"] or None, **kw)
    if len(data.data_shape) == 3:
        c, h, _ = data.data_shape
        for key, want, have in (("resolution", d["resolution"], h), ("channels", d["channels"], c)):
            if want and want != have:
                raise ValueError(f"data.{key}={want}, but {data.name} has {have}; set data.{key}=0 (or {have})")
    if d["n"] and name != "toy":
        data = data.head(d["n"])
    return data


def num_classes(cfg: dict, data: ImageData) -> int:
    return data.num_classes if cfg["data"]["conditional"] else 0


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def use_bf16(cfg: dict, device: torch.device) -> bool:
    """run.bf16 resolved for `device` ("auto": on where the device computes bf16 natively)."""
    return dist.resolve_bf16(cfg["run"]["bf16"], device)


def _train_settings(cfg: dict, section: dict, device: torch.device) -> TrainSettings:
    """The TrainSettings of config section `section` (teacher or student) with run.seed, run.bf16, run.progress."""
    return TrainSettings.from_config(section["train"], seed=cfg["run"]["seed"], bf16=use_bf16(cfg, device),
                                     device=device, progress=cfg["run"]["progress"])


def train_teacher(cfg: dict) -> Path:
    """Train the teacher on the dataset; returns the path of its `model.safetensors`."""
    _, _, _, device = dist.init_distributed(cfg["run"]["device"], cfg["run"]["deterministic"])
    data = load_data(cfg)
    ncls = num_classes(cfg, data)
    objective = teacher_objective(cfg["teacher"])
    model = build_model(objective, cfg["teacher"]["net"], data.data_shape, ncls, seed=cfg["run"]["seed"])
    out = run_dir(cfg) / "teacher"
    settings = _train_settings(cfg, cfg["teacher"], device)
    meta = model_meta("teacher", objective, cfg["teacher"]["net"], data.data_shape, ncls, cfg, settings.bf16)
    train(model, objective, data.source(cfg["run"]["seed"], labels=ncls > 0), settings, run_dir=out, meta=meta)
    dist.barrier()
    return out / "model.safetensors"


def teacher_sampler(teacher: Teacher, solver: str, steps: int, bf16: bool, schedule: str = "edm"):
    """generate(z, y) -> x1 with the teacher's deterministic ODE solver."""
    device = next(teacher.parameters()).device

    def generate(z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad(), _autocast(device, bf16):
            return sample_teacher(teacher, z.to(device), steps, solver, None if y is None else y.to(device),
                                  schedule=schedule).x.float()

    return generate


def generate_pairs(cfg: dict, teacher_path: str | Path | None = None, store: str | Path | None = None) -> Path:
    """Run the teacher's ODE solver on seeded noise and write a sharded pair store."""
    rank, world, _, device = dist.init_distributed(cfg["run"]["device"], cfg["run"]["deterministic"])
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
    out = Path(store or run_dir(cfg) / "pairs")
    make_pairs(out, teacher_sampler(teacher, t["solver"], t["steps"], bf16, t["schedule"]), n_pairs=p["n"],
               shard_size=p["shard_size"], data_shape=tuple(tmeta["data_shape"]), num_classes=tmeta["num_classes"],
               seed=p["seed"], meta=meta, batch_size=p["batch_size"], rank=rank, world=world, dtype=p["dtype"],
               progress=cfg["run"]["progress"], device=device, repair=p["repair"])
    dist.barrier()
    return out


def train_student(cfg: dict, store: str | Path | None = None, teacher_path: str | Path | None = None) -> Path:
    """Train the student of `student.objective`: "lines" (LMM) and "reflow" on a pair store (`store`, default
    RUN/pairs), "ot_cfm" and "consistency" on the dataset (data.*); the teacher (student.init = teacher, and
    consistency distillation's) is the pair store's, found by its sha256, or `teacher_path` / RUN/teacher.
    Returns the path of the student's `model.safetensors`."""
    _, _, _, device = dist.init_distributed(cfg["run"]["device"], cfg["run"]["deterministic"])
    s, run, seed = cfg["student"], run_dir(cfg), cfg["run"]["seed"]
    if s["init"] not in ("teacher", "scratch"):
        raise ValueError(f"student.init: unknown '{s['init']}'; valid: teacher, scratch")
    kind = student_objective_class(s["objective"])
    wants_teacher = s["init"] == "teacher" or kind.needs_teacher
    if kind.source == "pairs":
        store = Path(store or run / "pairs")
        source: Any = PairSource(store, seed=seed, window=s["window"], verify=False)
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
    train(model, objective, source, settings, run_dir=out, meta=meta, resume_defaults=resume_defaults(objective))
    dist.barrier()
    return out / "model.safetensors"


def real_source(cfg: dict, shape: tuple[int, ...], ncls: int) -> TensorSource:
    """Dataset images {"x", "y" when conditional} as a BatchSource (seed run.seed + 1), for loss terms that compare
    with real data; refused when the dataset's shape or classes differ from the pair store's."""
    data = load_data(cfg)
    if data.data_shape != tuple(shape) or (ncls and data.num_classes != ncls):
        raise ValueError(f"data.* ({data.name}: {data.data_shape}, {data.num_classes} classes) is not the "
                         f"data of the pair store ({tuple(shape)}, {ncls} classes)")
    return data.source(cfg["run"]["seed"] + 1, labels=ncls > 0)


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


def noise_batches(n: int, batch_size: int, shape: tuple[int, ...], ncls: int, seed: int, label: int | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Seeded noise in batches, identical for every model sampled with `seed`, and for conditional models
    labels: balanced (sample i has class i % ncls), or all `label`."""
    if label is not None and not 0 <= label < ncls:
        raise ValueError(f"class {label} is not one of the model's {ncls} classes" if ncls else
                         f"class {label} asked of an unconditional model")
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        z = torch.randn((b, *shape), generator=gen)
        y = None if not ncls else torch.full((b,), label) if label is not None else torch.arange(start, start + b) % ncls
        yield z, y


def restart_generator(seed: int, batch: int) -> torch.Generator:
    """The CPU generator of the restart sampler's fresh noise for noise batch `batch` of sampling seed `seed`:
    independent of the device, of the torchrun rank that samples the batch and of the initial noise's stream."""
    digest = hashlib.sha256(f"lmm-restart:{seed}:{batch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def sample(model: torch.nn.Module | Teacher, n: int, *, seed: int, batch_size: int = 500, nfe: int | None = None,
           grid: list[float] | None = None, mode: str | None = None, solver: str = "euler", steps: int | None = None,
           schedule: str = "edm", bf16: bool = False, device: str | torch.device = "cpu",
           progress: bool = False, label: int | None = None) -> dict[str, Any]:
    """Draw n samples. Teachers: `solver` with `steps` intervals on its `schedule`; students: the line sampler on `grid`
    (default grid for `nfe`) in `mode` (default: the model's own `sampler`, lmm.models.build_model; restart draws
    batch i's fresh noise from `restart_generator(seed, i)`); conditional models get balanced labels, or all
    `label`. Returns {"images": uint8 (N,H,W,C) (float (N, D) for vector data), "labels": (N,) or None,
    "nfe": int}. Under torchrun each rank samples a contiguous share of the seeded noise batches and every rank
    returns all n samples, identical to a single process's."""
    device = torch.device(device)
    is_teacher = isinstance(model, Teacher)
    inner = model.model if is_teacher else model
    shape, ncls = tuple(inner.data_shape), inner.num_classes
    if not is_teacher:
        grid = list(grid if grid is not None else default_grid(nfe or 1))
    mine, world = dist.shard(-(-n // batch_size)), dist.world_size()
    images, labels, used = [torch.empty(0, *shape)], [torch.empty(0, dtype=torch.long)], 0
    bar = progress_bar(n, desc="sample", unit="img", enabled=progress, leave=False)
    for i, (z, y) in enumerate(noise_batches(n, batch_size, shape, ncls, seed, label)):
        if i not in mine:
            continue
        z, y = z.to(device), None if y is None else y.to(device)
        with _autocast(device, bf16):
            if is_teacher:
                sol = sample_teacher(model, z, steps or nfe, solver, y, schedule=schedule)
            else:
                sol = sample_lines(model, z, grid, y, mode=mode or getattr(model, "sampler", "line"),
                                   generator=restart_generator(seed, i))
        used = sol.nfe
        images.append(sol.x.float().cpu())
        bar.update(z.shape[0] * world)
        if y is not None:
            labels.append(y.cpu())
    bar.close()
    x = dist.all_gather_tensor(torch.cat(images))
    y = dist.all_gather_tensor(torch.cat(labels)) if ncls else None
    used = -int(dist.all_reduce_min(torch.tensor([-used])).item())
    return {"images": to_uint8(x) if x.dim() == 4 else x.numpy(), "labels": None if y is None else y.numpy(),
            "nfe": used}


def save_samples(result: dict[str, Any], path: str | Path, grid_n: int = 64) -> Path:
    """Write `images` (and `labels`) to an .npz (atomically) and a PNG grid beside it: the first `grid_n` images,
    or for several classes one row per class (up to 16 classes, 8 samples each)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"images": result["images"]}
    if result.get("labels") is not None:
        arrays["labels"] = result["labels"]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    if result["images"].ndim == 4:
        labels = result.get("labels")
        if labels is not None and len(np.unique(labels)) > 1:
            per_class = [np.flatnonzero(labels == k)[:8] for k in np.unique(labels)[:16]]
            width = min(len(i) for i in per_class)
            save_image_grid(result["images"][np.concatenate([i[:width] for i in per_class])],
                            path.with_suffix(".png"), nrow=width)
        else:
            save_image_grid(result["images"][:grid_n], path.with_suffix(".png"))
    return path


class Timer:
    """Wall-clock seconds per named stage in `timings` and a JSON file. Seconds add up over invocations, so a
    stage that was interrupted and resumed (or rerun and found finished) shows the total time spent in it."""

    def __init__(self, path: Path):
        self.path = path
        self.timings: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 2)
        if dist.is_main():
            save_json(self.path, self.timings)

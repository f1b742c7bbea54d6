"""Score a run: teacher and student samples at several NFE against the dataset, into RUN_DIR/metrics.json."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmm import dist
from lmm.data.images import to_uint8
from lmm.io import file_sha256, save_json
from lmm.metrics import (
    FeatureStats,
    compute_stats,
    frechet_distance_stats,
    get_extractor,
    hash_images,
    knn_radii,
    load_stats,
    precision_recall,
    save_stats,
    straightness,
)
from lmm.models import load_model
from lmm.pipeline import load_data, noise_batches, run_dir, sample, save_samples
from lmm.sampling import default_grid, sample_lines
from lmm.teachers import Teacher
from lmm.teachers.base import sample_teacher

DISTANCE_KEYS = {"inception": "fid", "proxy": "fd_proxy", "pixel": "fd_pixel"}
STRAIGHTNESS_BATCH = 256


def _stats(extractor: Any, samples: np.ndarray) -> FeatureStats:
    """Statistics (features kept) of images (N, H, W, C) uint8 on the extractor, shared across torchrun ranks
    (lmm.metrics.compute_stats), or of 2-D points (N, 2) as their own features."""
    if samples.ndim == 2:
        stats = FeatureStats(keep_features=True)
        stats.add(torch.as_tensor(samples, dtype=torch.float64))
        return stats
    return compute_stats(extractor, samples, keep_features=True)


def _eval_split(cfg: dict) -> str:
    return cfg["eval"]["split"] or cfg["data"]["split"]


@dataclass
class Reference:
    """What samples are scored against: the dataset's features (kept, for precision/recall), the extractor
    (None for 2-D points, which are their own features), the metric key of the distance and the k-NN radii
    of the reference features (computed on first use)."""
    stats: FeatureStats
    extractor: Any
    key: str
    name: str
    radii: torch.Tensor | None = None


def reference(cfg: dict, device: torch.device, cache: Path | None = None) -> Reference:
    """Reference of the dataset named by cfg["data"], split eval.split (data.split when empty), on eval.features.
    Image statistics are read from `cache` when it holds them for the same extractor, network file and data
    (else refused), else computed (shared across torchrun ranks) and cached."""
    split = _eval_split(cfg)
    data = load_data({**cfg, "data": {**cfg["data"], "split": split}})
    name = data.name
    if data.x.dim() == 2:
        return Reference(_stats(None, data.x.numpy()), None, "fd_points", name)
    features = cfg["eval"]["features"]
    extractor = get_extractor(features, device, progress=cfg["run"]["progress"] and dist.is_main())
    images = to_uint8(data.x)
    data_hash = hash_images(images)
    if cache is not None and cache.is_file():
        stats = load_stats(cache, extractor, data_hash)
    else:
        stats = _stats(extractor, images)
        if cache is not None and dist.is_main():
            save_stats(cache, stats, {"data": cfg["data"], "split": split}, extractor=extractor, data_hash=data_hash)
    return Reference(stats, extractor, DISTANCE_KEYS[features], name)


def reference_file(path: Path, features: str, device: torch.device, progress: bool = True) -> Reference:
    """Reference from a statistics file alone (written by lmm.metrics.save_stats: `lmm eval --ref-cache`,
    RUN/reference-*.npz), without reading the dataset; refused if made by another extractor or network file."""
    if not path.is_file():
        raise FileNotFoundError(f"--ref {path}: no such statistics file")
    extractor = get_extractor(features, device, progress=progress)
    return Reference(load_stats(path, extractor), extractor, DISTANCE_KEYS[features], str(path))


def score(ref: Reference, samples: np.ndarray) -> dict[str, float | None]:
    """Frechet distance (under ref.key) and precision/recall (k = 3; None when the reference kept no
    features) of samples against the reference."""
    fake = _stats(ref.extractor, samples)
    pr: dict[str, float | None] = {"precision": None, "recall": None}
    if ref.stats.features is not None:
        if ref.radii is None:
            ref.radii = knn_radii(ref.stats.features, 3)
        pr = precision_recall(ref.stats.features, fake.features, k=3, real_radii=ref.radii)
    return {ref.key: frechet_distance_stats(ref.stats, fake), "precision": pr["precision"], "recall": pr["recall"]}


def sweep(model: torch.nn.Module | Teacher, nfes: list[int], student_grid: list[float]) -> list[dict[str, Any]]:
    """Sampler settings per NFE: Euler with k steps for teachers; for students `student_grid` when k equals its
    length, lmm.sampling.default_grid(k) otherwise."""
    if isinstance(model, Teacher):
        return [{"solver": "euler", "steps": k} for k in nfes]
    return [{"solver": "lines", "grid": student_grid if k == len(student_grid) else default_grid(k)} for k in nfes]


@torch.no_grad()
def trajectory_straightness(model: torch.nn.Module | Teacher, *, seed: int, solver: str, steps: int | None,
                            grid: list[float] | None, device: torch.device) -> float:
    """Straightness (lmm.metrics.straightness) of the sampling trajectory on one seeded batch, with teacher
    trajectories mapped to the line convention (Teacher.to_line) so that teachers and students compare."""
    inner = model.model if isinstance(model, Teacher) else model
    z, y = next(noise_batches(STRAIGHTNESS_BATCH, STRAIGHTNESS_BATCH, tuple(inner.data_shape), inner.num_classes, seed))
    z, y = z.to(device), None if y is None else y.to(device)
    if isinstance(model, Teacher):
        sol = sample_teacher(model, z, steps, solver, y, return_trajectory=True)
        points = [model.to_line(x, t) for x, t in zip(sol.trajectory, model.grid(steps))]
        states, times = [x for x, _ in points], torch.stack([t for _, t in points])
    else:
        sol = sample_lines(model, z, grid, y, return_trajectory=True)
        states, times = sol.trajectory, torch.tensor([*grid, 1.0], dtype=torch.float64)
    return straightness([x.float().cpu() for x in states], times)


def evaluate_sampler(cfg: dict, ref: Reference, role: str, model: torch.nn.Module | Teacher, how: dict[str, Any],
                     device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample eval.n from eval.seed with the sampler `how` (see `sweep`); returns (metrics row, samples)."""
    e = cfg["eval"]
    start = time.perf_counter()
    out = sample(model, e["n"], seed=e["seed"], batch_size=e["batch_size"], bf16=cfg["run"]["bf16"], device=device,
                 progress=cfg["run"]["progress"] and dist.is_main(), **how)
    seconds = time.perf_counter() - start
    row = {"label": f"{role} {how['solver']} NFE {out['nfe']}", "model": role, "solver": how["solver"],
           "nfe": out["nfe"], "time_grid": how.get("grid"), **score(ref, out["images"]), "seconds": round(seconds, 2),
           "straightness": trajectory_straightness(model, seed=e["seed"], solver=how["solver"],
                                                   steps=how.get("steps"), grid=how.get("grid"), device=device)}
    return row, out


def _row_key(role: str, how: dict[str, Any]) -> str:
    return json.dumps({"model": role, **how}, sort_keys=True)


def evaluate_run(cfg: dict, teacher_path: str | Path | None = None, student_path: str | Path | None = None) -> dict:
    """Sample the teacher (Euler at eval.teacher_nfe, and its own solver and steps) and the student
    (eval.student_nfe; student.grid for its own NFE, lmm.sampling.default_grid otherwise) from the same
    seeded noise; write samples, grids and RUN_DIR/metrics.json.

    metrics.json is rewritten after every row, and a rerun with the same models and eval settings keeps the
    rows already there, so an interrupted evaluation resumes. Reference statistics are cached in
    RUN_DIR/reference-FEATURES-SPLIT.npz (refused if the network or data changed)."""
    e, run = cfg["eval"], run_dir(cfg)
    device = dist.init_distributed(cfg["run"]["device"]).device
    teacher_path = Path(teacher_path or run / "teacher" / "model.safetensors")
    student_path = Path(student_path or run / "student" / "model.safetensors")
    ref = reference(cfg, device, run / f"reference-{e['features']}-{_eval_split(cfg)}.npz")

    teacher, tmeta = load_model(teacher_path, device)
    student, _ = load_model(student_path, device)
    t = tmeta["teacher"]
    runs: list[tuple[str, Any, dict[str, Any]]] = [("teacher", teacher, how)
                                                   for how in sweep(teacher, e["teacher_nfe"], [])]
    runs.append(("teacher", teacher, {"solver": t["solver"], "steps": t["steps"]}))
    runs += [("student", student, how) for how in sweep(student, e["student_nfe"], cfg["student"]["grid"])]

    features = e["features"] if ref.extractor is not None else "points"
    settings = {"features": features, "reference": ref.name, "reference_n": ref.stats.n, "n": e["n"],
                "seed": e["seed"], "bf16": cfg["run"]["bf16"], "teacher_sha256": file_sha256(teacher_path),
                "student_sha256": file_sha256(student_path)}
    metrics = {
        "distance_key": ref.key,
        "features": features,
        "description": (f"{ref.key}: Frechet distance on {features} features of {e['n']} samples (noise seed "
                        f"{e['seed']}) against {ref.stats.n} {ref.name} images; precision/recall with k=3 on the "
                        f"same features; straightness on {STRAIGHTNESS_BATCH} trajectories."),
        "teacher": str(teacher_path), "student": str(student_path), "settings": settings, "results": [],
    }
    path = run / "metrics.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    done = {r["key"]: r for r in old.get("results", []) if "key" in r} if old.get("settings") == settings else {}
    for role, model, how in runs:
        key = _row_key(role, how)
        if key in done:
            metrics["results"].append(done[key])
            continue
        row, out = evaluate_sampler(cfg, ref, role, model, how, device)
        slug = row["label"].replace(" ", "_").lower()
        row["grid"], row["key"] = None, key
        if dist.is_main():
            save_samples(out, run / "samples" / f"{slug}.npz")
            row["grid"] = f"samples/{slug}.png" if out["images"].ndim == 4 else None
        metrics["results"].append(row)
        if dist.is_main():
            save_json(path, metrics)
    if dist.is_main():
        save_json(path, metrics)
    return metrics


def evaluate_inputs(cfg: dict, *, samples: list[Path] = (), model: Path | None = None, nfes: list[int] = (),
                    cache: Path | None = None, ref_file: Path | None = None) -> dict:
    """`lmm eval`: score sample files (.npz with `images`) and/or a model sampled at each NFE in `nfes`
    (see `sweep`) against the dataset of cfg["data"] (split eval.split; statistics cached in `cache`) or,
    given `ref_file`, against that statistics file alone; with eval.features, eval.n samples and eval.seed."""
    device = dist.init_distributed(cfg["run"]["device"]).device
    if ref_file is not None and cache is not None:
        raise ValueError("lmm eval: give --ref (a statistics file alone) or --ref-cache (dataset + cache), not both")
    progress = cfg["run"]["progress"] and dist.is_main()
    ref = reference(cfg, device, cache) if ref_file is None else reference_file(ref_file, cfg["eval"]["features"],
                                                                               device, progress)
    rows = []
    for path in samples:
        with np.load(path) as f:
            if "images" not in f:
                raise ValueError(f"{path}: no 'images' array (expected uint8 N x H x W x C from lmm sample)")
            images = f["images"]
        rows.append({"label": str(path), "model": "file", **score(ref, images)})
    if model is not None:
        net, meta = load_model(model, device)
        rows += [evaluate_sampler(cfg, ref, meta["role"], net, how, device)[0]
                 for how in sweep(net, list(nfes), meta["config"]["student"]["grid"])]
    return {"distance_key": ref.key, "features": cfg["eval"]["features"] if ref.extractor is not None else "points",
            "reference": f"{ref.stats.n} {ref.name}", "results": rows}

"""Score a run: teacher and student samples at several NFE against the dataset, into RUN_DIR/metrics.json."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmm import dist
from lmm.data.images import to_uint8
from lmm.io import save_json
from lmm.metrics import (
    FeatureStats,
    compute_stats,
    frechet_distance_stats,
    get_extractor,
    hash_images,
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


def _features(extractor: Any, samples: np.ndarray) -> torch.Tensor:
    """(N, D) features: the extractor's for images (N, H, W, C) uint8, the points themselves for 2-D data."""
    if samples.ndim == 2:
        return torch.as_tensor(samples, dtype=torch.float64)
    return torch.as_tensor(extractor(samples), dtype=torch.float64)


def reference_stats(cfg: dict, extractor: Any, cache: Path | None = None) -> FeatureStats:
    """Features of the dataset named by cfg["data"] (kept, for precision/recall), read from `cache` when it
    holds them for the same extractor, network file and data (else refused), computed and cached otherwise."""
    data = load_data(cfg)
    if data.x.dim() == 2:
        stats = FeatureStats(keep_features=True)
        stats.add(_features(None, data.x.numpy()))
        return stats
    images = to_uint8(data.x)
    data_hash = hash_images(images)
    if cache is not None and cache.is_file():
        return load_stats(cache, extractor, data_hash)
    stats = compute_stats(extractor, images, keep_features=True)
    if cache is not None and dist.is_main():
        save_stats(cache, stats, {"data": cfg["data"]}, extractor=extractor, data_hash=data_hash)
    return stats


def score(real: FeatureStats, extractor: Any, samples: np.ndarray, key: str) -> dict[str, float]:
    """Frechet distance (under `key`) and precision/recall (k = 3) of samples against `real`."""
    fake = FeatureStats(keep_features=True)
    fake.add(_features(extractor, samples))
    pr = precision_recall(real.features, fake.features, k=3)
    return {key: frechet_distance_stats(real, fake), "precision": pr["precision"], "recall": pr["recall"]}


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


def evaluate_run(cfg: dict, teacher_path: str | Path | None = None, student_path: str | Path | None = None) -> dict:
    """Sample the teacher (Euler at eval.teacher_nfe, and its own solver and steps) and the student
    (eval.student_nfe; student.grid for its own NFE, lmm.sampling.default_grid otherwise) from the same
    seeded noise; write samples, grids and RUN_DIR/metrics.json."""
    e, run = cfg["eval"], run_dir(cfg)
    device = dist.init_distributed(cfg["run"]["device"]).device
    teacher_path = Path(teacher_path or run / "teacher" / "model.safetensors")
    student_path = Path(student_path or run / "student" / "model.safetensors")
    data = load_data(cfg)
    extractor = None if data.x.dim() == 2 else get_extractor(e["features"], device)
    real = reference_stats(cfg, extractor)

    teacher, tmeta = load_model(teacher_path, device)
    student, _ = load_model(student_path, device)
    t = tmeta["teacher"]
    runs: list[tuple[str, Any, dict[str, Any]]] = [("teacher", teacher, how)
                                                   for how in sweep(teacher, e["teacher_nfe"], [])]
    runs.append(("teacher", teacher, {"solver": t["solver"], "steps": t["steps"]}))
    runs += [("student", student, how) for how in sweep(student, e["student_nfe"], cfg["student"]["grid"])]

    key = DISTANCE_KEYS[e["features"]] if extractor is not None else "fd_points"
    rows = []
    for role, model, how in runs:
        start = time.perf_counter()
        out = sample(model, e["n"], seed=e["seed"], batch_size=e["batch_size"], bf16=cfg["run"]["bf16"],
                     device=device, progress=cfg["run"]["progress"] and dist.is_main(), **how)
        seconds = time.perf_counter() - start
        label = f"{role} {how['solver']} NFE {out['nfe']}"
        slug = label.replace(" ", "_").lower()
        grid_png = None
        if dist.is_main():
            save_samples(out, run / "samples" / f"{slug}.npz")
            grid_png = f"samples/{slug}.png" if out["images"].ndim == 4 else None
        rows.append({
            "label": label, "model": role, "solver": how["solver"], "nfe": out["nfe"],
            "grid": grid_png, "time_grid": how.get("grid"), **score(real, extractor, out["images"], key),
            "seconds": round(seconds, 2),
            "straightness": trajectory_straightness(model, seed=e["seed"], solver=how["solver"],
                                                    steps=how.get("steps"), grid=how.get("grid"), device=device),
        })
    metrics = {
        "distance_key": key,
        "features": e["features"] if extractor is not None else "points",
        "description": (f"{key}: Frechet distance on {e['features'] if extractor is not None else 'raw 2-D'} features "
                        f"of {e['n']} samples (noise seed {e['seed']}) against {real.n} {data.name} "
                        f"({cfg['data']['split']}) images; precision/recall with k=3 on the same features; "
                        f"straightness on {STRAIGHTNESS_BATCH} trajectories."),
        "teacher": str(teacher_path), "student": str(student_path), "results": rows,
    }
    if dist.is_main():
        save_json(run / "metrics.json", metrics)
    return metrics


def evaluate_inputs(cfg: dict, *, samples: list[Path] = (), model: Path | None = None, nfes: list[int] = (),
                    cache: Path | None = None) -> dict:
    """`lmm eval`: score sample files (.npz with `images`) and/or a model sampled at each NFE in `nfes`
    (see `sweep`) against the dataset of cfg["data"], with eval.features, eval.n samples and eval.seed."""
    e = cfg["eval"]
    device = dist.init_distributed(cfg["run"]["device"]).device
    points = cfg["data"]["name"] == "toy"
    extractor = None if points else get_extractor(e["features"], device)
    real = reference_stats(cfg, extractor, cache)
    key = "fd_points" if points else DISTANCE_KEYS[e["features"]]
    rows = []
    for path in samples:
        with np.load(path) as f:
            if "images" not in f:
                raise ValueError(f"{path}: no 'images' array (expected uint8 N x H x W x C from lmm sample)")
            images = f["images"]
        rows.append({"label": str(path), "model": "file", **score(real, extractor, images, key)})
    if model is not None:
        net, meta = load_model(model, device)
        for how in sweep(net, list(nfes), meta["config"]["student"]["grid"]):
            out = sample(net, e["n"], seed=e["seed"], batch_size=e["batch_size"], device=device, **how)
            rows.append({"label": f"{meta['role']} {how['solver']} NFE {out['nfe']}", "model": meta["role"],
                         "solver": how["solver"], "nfe": out["nfe"], **score(real, extractor, out["images"], key),
                         "straightness": trajectory_straightness(net, seed=e["seed"], solver=how["solver"],
                                                                 steps=how.get("steps"), grid=how.get("grid"),
                                                                 device=device)})
    return {"distance_key": key, "features": "points" if points else e["features"],
            "reference": f"{real.n} {cfg['data']['name']} ({cfg['data']['split']})", "results": rows}

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
    frechet_distance_stats,
    get_extractor,
    precision_recall,
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
    reference = data.x.numpy() if data.x.dim() == 2 else to_uint8(data.x)
    real = FeatureStats(keep_features=True)
    real.add(_features(extractor, reference))

    teacher, tmeta = load_model(teacher_path, device)
    student, _ = load_model(student_path, device)
    t = tmeta["teacher"]
    runs: list[tuple[str, Any, dict[str, Any]]] = [
        ("teacher", teacher, {"solver": "euler", "steps": k}) for k in e["teacher_nfe"]]
    runs.append(("teacher", teacher, {"solver": t["solver"], "steps": t["steps"]}))
    grid = cfg["student"]["grid"]
    for k in e["student_nfe"]:
        runs.append(("student", student, {"solver": "lines", "grid": grid if k == len(grid) else default_grid(k)}))

    key = DISTANCE_KEYS[e["features"]] if extractor is not None else "fd_points"
    rows = []
    for role, model, how in runs:
        start = time.perf_counter()
        out = sample(model, e["n"], seed=e["seed"], batch_size=e["batch_size"], bf16=cfg["run"]["bf16"],
                     device=device, progress=cfg["run"]["progress"] and dist.is_main(), **how)
        seconds = time.perf_counter() - start
        fake = FeatureStats(keep_features=True)
        fake.add(_features(extractor, out["images"]))
        label = f"{role} {how['solver']} NFE {out['nfe']}"
        slug = label.replace(" ", "_").lower()
        grid_png = None
        if dist.is_main():
            save_samples(out, run / "samples" / f"{slug}.npz")
            grid_png = f"samples/{slug}.png" if out["images"].ndim == 4 else None
        pr = precision_recall(real.features, fake.features, k=3)
        rows.append({
            "label": label, "model": role, "solver": how["solver"], "nfe": out["nfe"],
            "grid": grid_png, "time_grid": how.get("grid"), key: frechet_distance_stats(real, fake),
            "precision": pr["precision"], "recall": pr["recall"], "seconds": round(seconds, 2),
            "straightness": trajectory_straightness(model, seed=e["seed"], solver=how["solver"],
                                                    steps=how.get("steps"), grid=how.get("grid"), device=device),
        })
    metrics = {
        "distance_key": key,
        "features": e["features"] if extractor is not None else "points",
        "description": (f"{key}: Frechet distance on {e['features'] if extractor is not None else 'raw 2-D'} features "
                        f"of {e['n']} samples (noise seed {e['seed']}) against {len(reference)} {data.name} "
                        f"({cfg['data']['split']}) images; precision/recall with k=3 on the same features; "
                        f"straightness on {STRAIGHTNESS_BATCH} trajectories."),
        "teacher": str(teacher_path), "student": str(student_path), "results": rows,
    }
    if dist.is_main():
        save_json(run / "metrics.json", metrics)
    return metrics

"""The endpoint predictor's collapse toward the data mean near the noise end (line time t -> 0).

At t = 0 an endpoint predictor trained on the independent coupling can only answer E[x1 | z] = the data mean: its
predictions sit at the mean with no spread across noises. A lines model trained on a deterministic coupling has a
sample as its answer at every t. `analyze_singularity` measures both for a run's teacher and student.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmm.data.arrays import model_rows
from lmm.io import atomic_write_text, save_json
from lmm.metrics.straightness import endpoint_spread, straightness

DEFAULT_TIMES = (0.0, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def run_config(run: Path) -> dict:
    """The config a run folder's models were made with: RUN/config.json (else the config recorded in a model file)
    over lmm.config's defaults."""
    from lmm.config import load_config

    sources = [run / "config.json", run / "teacher" / "model.json", run / "student" / "model.json"]
    for path in sources:
        if path.is_file():
            try:
                recorded = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read {path}: {e}") from e
            recorded = recorded if path.name == "config.json" else recorded.get("config", {})
            cfg = load_config()
            for section in ("run", "data"):
                cfg[section].update(recorded.get(section, {}))
            return cfg
    raise FileNotFoundError(f"{run}: no config.json and no model.json to read the run's data settings from")


def _rows(images: Any, i: int, j: int) -> Tensor:
    return model_rows(images, slice(i, j), torch.float64).double()


def data_statistics(data: Any, chunk: int = 8192) -> dict[str, Any]:
    """The dataset's own spread in endpoint_spread's terms: {"mean": (*data_shape) float64, "dist_to_mean": mean over
    samples of the RMS (over elements) distance to the mean, "pixel_std": per-element std across samples averaged
    over elements, "n"}. data: an lmm.data.arrays.ImageData (images in model units)."""
    images, n = data.images, len(data)
    if n < 2:
        raise ValueError(f"data.*: {data.name} holds {n} samples; the analysis needs >= 2")
    total = torch.zeros(data.data_shape, dtype=torch.float64)
    for i in range(0, n, chunk):
        total += _rows(images, i, min(n, i + chunk)).sum(0)
    mean = total / n
    sq = torch.zeros_like(mean)
    dist = 0.0
    for i in range(0, n, chunk):
        dev = _rows(images, i, min(n, i + chunk)) - mean
        sq += dev.square().sum(0)
        dist += dev.flatten(1).square().mean(1).sqrt().sum().item()
    return {"mean": mean, "dist_to_mean": dist / n, "pixel_std": (sq / (n - 1)).sqrt().mean().item(), "n": n}


@torch.no_grad()
def teacher_along_ode(teacher: Any, z: Tensor, y: Tensor | None, times: list[float], steps: int
                      ) -> tuple[list[Tensor], Tensor, dict[str, float]]:
    """The teacher's endpoint predictions along its own deterministic ODE written in line time,
    dx/dt = (N(x_t, t) - x_t) / (1 - t) with N = Teacher.line_endpoint, from x_0 = z (B, ...): Euler on the union of
    `times` and k / steps. Returns (predictions at `times`, each (B, ...); the ODE's endpoint (B, ...);
    {"straightness": lmm.metrics.straightness of the path, "chord": mean_batch mean_dims (x_1 - z)^2})."""
    from lmm.evaluate import _LineEndpoint
    from lmm.sampling import sample_lines

    grid = sorted(set(times) | {k / steps for k in range(steps)})
    sol = sample_lines(_LineEndpoint(teacher), z, grid, y, return_trajectory=True)
    path = [x.double().cpu() for x in sol.trajectory]
    chord = (path[-1] - path[0]).flatten(1).square().mean(1).mean().item()
    s = straightness(path, torch.tensor([*grid, 1.0], dtype=torch.float64))
    return [sol.endpoints[grid.index(t)] for t in times], sol.x, {"straightness": s, "chord": chord}


@torch.no_grad()
def student_along_line(student: nn.Module, z: Tensor, y: Tensor | None, times: list[float]
                       ) -> tuple[list[Tensor], Tensor]:
    """A line student's endpoint predictions N((1-t) z + t x1, t) on the line from z (B, ...) to its own one-step
    endpoint x1 = N(z, 0): (predictions at `times`, each (B, ...); x1 (B, ...))."""
    was_training = student.training
    student.eval()
    try:
        x1 = student(z, torch.zeros(z.shape[0], device=z.device), y)
        preds = [student((1 - t) * z + t * x1, torch.full((z.shape[0],), t, device=z.device), y) for t in times]
    finally:
        student.train(was_training)
    return preds, x1


def _spread(preds: list[Tensor], data: dict[str, Any]) -> dict[str, list[float]]:
    s = endpoint_spread(preds, data["mean"])
    return {**s, "dist_to_mean_rel": [v / data["dist_to_mean"] for v in s["dist_to_mean"]],
            "pixel_std_rel": [v / data["pixel_std"] for v in s["pixel_std"]]}


def _analyze_model(role: str, model: Any, batches: list[tuple[Tensor, Tensor | None]], times: list[float],
                   steps: int, data: dict[str, Any], device: torch.device) -> dict[str, Any]:
    start = time.perf_counter()
    per_time: list[list[Tensor]] = [[] for _ in times]
    ends: list[Tensor] = []
    s_sum, chord_sum, count = 0.0, 0.0, 0
    for z, y in batches:
        z, y = z.to(device), None if y is None else y.to(device)
        if role == "teacher":
            preds, end, ode = teacher_along_ode(model, z, y, times, steps)
            s_sum += ode["straightness"] * z.shape[0]
            chord_sum += ode["chord"] * z.shape[0]
        else:
            preds, end = student_along_line(model, z, y, times)
        count += z.shape[0]
        for acc, p in zip(per_time, preds):
            acc.append(p.float().cpu())
        ends.append(end.float().cpu())
    out: dict[str, Any] = _spread([torch.cat(p) for p in per_time], data)
    sample = _spread([torch.cat(ends)], data)
    out["sample"] = {k: v[0] for k, v in sample.items()}
    if role == "teacher":
        out["straightness"] = s_sum / count
        out["straightness_rel"] = s_sum / max(chord_sum, 1e-300)
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def markdown(result: dict[str, Any]) -> str:
    """The analysis as a markdown table (one row per line time) and the teacher path's straightness."""
    roles = [r for r in ("teacher", "student") if result.get(r)]
    head = ["t"] + [f"{r} {k}" for r in roles for k in ("dist to mean", "spread")]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for k, t in enumerate(result["times"]):
        cells = [f"{t:g}"] + [f"{result[r][key][k]:.3f}" for r in roles
                              for key in ("dist_to_mean_rel", "pixel_std_rel")]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["sample"] + [f"{result[r]['sample'][key]:.3f}" for r in roles for key in ("dist_to_mean_rel",
                                                                                       "pixel_std_rel")]
    lines.append("| " + " | ".join(cells) + " |")
    text = (f"Endpoint predictions on {result['n']} seeded noises (seed {result['seed']}), relative to the data's own "
            f"RMS distance to its mean ({result['data']['dist_to_mean']:.4g}) and per-pixel std "
            f"({result['data']['pixel_std']:.4g}) over {result['data']['n']} items of {result['data']['name']} "
            "(0 = collapsed onto the mean, 1 = as spread as the data; 'sample' = the ODE's or the one-step "
            "endpoint):\n\n" + "\n".join(lines) + "\n")
    if result.get("teacher"):
        t = result["teacher"]
        text += (f"\nTeacher ODE path (Euler in line time, {result['teacher_ode_points']} grid points): straightness "
                 f"{t['straightness']:.4g} per dimension, {t['straightness_rel']:.4g} relative to the squared "
                 "chord.\n")
    return text


def _plots(result: dict[str, Any]) -> dict[str, str]:
    from lmm.report import svg_plot

    series: dict[str, list[tuple[float, float]]] = {}
    for role in ("teacher", "student"):
        if result.get(role):
            r = result[role]
            series[f"{role} dist to mean"] = list(zip(result["times"], r["dist_to_mean_rel"]))
            series[f"{role} spread"] = list(zip(result["times"], r["pixel_std_rel"]))
    return {"singularity.svg": svg_plot(series, "line time t", "relative to the data"),
            "singularity_logt.svg": svg_plot(series, "line time t (log)", "relative to the data", logx=True)}


def analyze_singularity(run: str | Path, *, n: int = 512, seed: int = 0, steps: int = 32, batch_size: int = 256,
                        times: list[float] = DEFAULT_TIMES, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Endpoint collapse of RUN/teacher and RUN/student (whichever exist; ValueError if neither) on n seeded noises
    (lmm.generate.noise_batches, seed): at each line time in `times`, lmm.metrics.straightness.endpoint_spread of
    the predictions (distance to the data mean, spread across samples), absolute and relative to the data's own
    (`data_statistics` of the run's data.*); the teacher along its own ODE (`teacher_along_ode`, `steps`), the
    student along its line (`student_along_line`). Writes RUN/analysis/singularity.json, singularity.svg (against t)
    and singularity_logt.svg (log t); returns the JSON's content, whose "markdown" holds the table."""
    from lmm.data.from_config import load_data
    from lmm.generate import noise_batches
    from lmm.models import load_model, model_path
    from lmm.teachers import Teacher

    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    if n < 2 or steps < 1 or batch_size < 1 or seed < 0:
        raise ValueError(f"singularity analysis needs n >= 2, steps >= 1, batch_size >= 1, seed >= 0; got n={n}, "
                         f"steps={steps}, batch_size={batch_size}, seed={seed}")
    times = sorted(float(t) for t in times)
    if not times or times[0] < 0 or times[-1] >= 1:
        raise ValueError(f"singularity analysis times must lie in [0, 1), got {times}")
    files = {role: model_path(run / role) for role in ("teacher", "student")}
    files = {role: p for role, p in files.items() if p.is_file()}
    if not files:
        raise ValueError(f"{run}: neither teacher/model.safetensors nor student/model.safetensors exists")
    device = torch.device(device)
    cfg = run_config(run)
    data = load_data(cfg)
    stats = data_statistics(data)
    result: dict[str, Any] = {
        "run": str(run), "n": n, "seed": seed, "times": times, "teacher_ode_points": None,
        "data": {"name": data.name, "n": stats["n"], "dist_to_mean": stats["dist_to_mean"],
                 "pixel_std": stats["pixel_std"]},
        "description": "dist_to_mean: mean over noises of the RMS (over elements) distance of the endpoint "
                       "prediction to the data mean; pixel_std: per-element std across noises, averaged over "
                       "elements (lmm.metrics.straightness.endpoint_spread); *_rel: divided by the same statistics "
                       "of the data. Teacher: Teacher.line_endpoint along its own deterministic ODE in line time "
                       "(Euler, analysis times plus k/steps); student: N((1-t) z + t x1, t) on the line to its "
                       "one-step endpoint x1 = N(z, 0). sample: the ODE's / one-step endpoint.",
        "teacher": None, "student": None,
    }
    for role, path in files.items():
        model, meta = load_model(path, device)
        if meta["role"] != role or (role == "teacher") != isinstance(model, Teacher):
            raise ValueError(f"{path}: holds a {meta['role']} model, expected a {role}")
        inner = model.model if isinstance(model, Teacher) else model
        shape, ncls = tuple(inner.data_shape), inner.num_classes
        if shape != tuple(data.data_shape):
            raise ValueError(f"{path}: model data shape {shape} differs from the run's data ({data.name}: "
                             f"{tuple(data.data_shape)})")
        batches = list(noise_batches(n, batch_size, shape, ncls, seed))
        result[role] = {"model": str(path), **_analyze_model(role, model, batches, times, steps, stats, device)}
        if role == "teacher":
            result["teacher"]["kind"] = model.kind
            result["teacher_ode_points"] = len(set(times) | {k / steps for k in range(steps)})
    result["markdown"] = markdown(result)
    out = run / "analysis"
    for name, svg in _plots(result).items():
        if svg:
            atomic_write_text(out / name, svg)
    save_json(out / "singularity.json", result)
    return result

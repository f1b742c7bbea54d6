"""Score a run: teacher and student samples at several NFE against the dataset, into RUN_DIR/metrics.json."""
from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmm import dist
from lmm.data.arrays import ImageData
from lmm.data.from_config import load_data
from lmm.generate import noise_batches, sample, save_samples
from lmm.io import file_sha256, path_sha256, save_json
from lmm.metrics import (
    FeatureStats,
    compute_stats,
    endpoint_consistency,
    frechet_distance_stats,
    get_extractor,
    hash_images,
    knn_radii,
    load_stats,
    precision_recall,
    read_meta,
    save_stats,
    straightness,
    subset_indices,
)
from lmm.metrics.reference import is_edm_stats, load_edm_stats
from lmm.models import load_model, model_path
from lmm.runs import run_dir, use_bf16, use_compile
from lmm.sampling import grid_for, sample_lines
from lmm.solvers import DPM_METHODS, steps_within
from lmm.teachers import Teacher

DISTANCE_KEYS = {"inception": "fid", "proxy": "fd_proxy", "pixel": "fd_pixel"}
PR_K = 3
OWN_ODE_STEPS = 32
STRAIGHTNESS_BATCH = 256


def _stats(extractor: Any, samples: np.ndarray) -> FeatureStats:
    """Statistics (features kept) of images (N, H, W, C) uint8 on the extractor, shared across torchrun ranks
    (lmm.metrics.compute_stats), or of 2-D points (N, 2) as their own features."""
    if samples.ndim == 2:
        stats = FeatureStats(keep_features=True)
        stats.add(torch.as_tensor(samples, dtype=torch.float64))
        return stats
    return compute_stats(extractor, samples, keep_features=True)


def reference_cache(cfg: dict) -> Path:
    """Where a run caches its reference statistics: RUN_DIR/reference-FEATURES-SPLIT.npz."""
    return run_dir(cfg) / f"reference-{cfg['eval']['features']}-{_eval_split(cfg)}.npz"


def _eval_split(cfg: dict) -> str:
    return cfg["eval"]["split"] or cfg["data"]["split"]


def eval_data(cfg: dict) -> ImageData:
    """The dataset of cfg["data"] in split eval.split (data.split when empty)."""
    return load_data({**cfg, "data": {**cfg["data"], "split": _eval_split(cfg)}})


def _lmm_source(name: str, split: str, n: int) -> str:
    return f"lmm statistics of data {name} split {split}, n {n}"


@dataclass
class Reference:
    """What samples are scored against: the dataset's features (kept, for precision/recall), the extractor
    (None for 2-D points, which are their own features), the metric key of the distance, a name, the seed of
    the random subsets that equalise real and generated counts for precision/recall (eval.seed), where the
    statistics came from (`provenance`, metrics.json's "reference": "source" in words, "sha256" of the statistics
    file or None, "data_sha256" (lmm.metrics.hash_images of the dataset images) or None, "n" the count or None)
    and, per subset size, the real subset's indices and k-NN radii (computed on first use)."""
    stats: FeatureStats
    extractor: Any
    key: str
    name: str
    seed: int
    provenance: dict[str, Any]
    pr_subsets: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def features_name(self) -> str:
        """Name of the features: the extractor's, or "points" for 2-D points."""
        return self.extractor.name if self.extractor is not None else "points"

    @property
    def impl(self) -> str | None:
        """The extractor's implementation (FeatureExtractor.impl), None for 2-D points."""
        return self.extractor.impl if self.extractor is not None else None

    def real_subset(self, m: int) -> tuple[Tensor, Tensor]:
        """(indices (m',), k-NN radii (m',) with k = PR_K) of the seeded random subset of m' = min(m, N) of the
        N reference features (lmm.metrics.subset_indices), computed once per m."""
        if self.stats.features is None:
            raise ValueError(f"reference {self.name}: no features kept, so no precision/recall")
        if m not in self.pr_subsets:
            idx = subset_indices(self.stats.n, m, self.seed)
            self.pr_subsets[m] = idx, knn_radii(self.stats.features[idx], PR_K)
        return self.pr_subsets[m]


def reference(cfg: dict, device: torch.device, cache: Path | None = None, data: ImageData | None = None) -> Reference:
    """Reference of `data` (default: `eval_data`, the dataset named by cfg["data"] in split eval.split) on
    eval.features. Image statistics are read from `cache` when it holds them for the same extractor,
    implementation, network file and data (else refused), else computed (shared across torchrun ranks) and cached."""
    split = _eval_split(cfg)
    data = eval_data(cfg) if data is None else data
    name, seed = data.name, cfg["eval"]["seed"]
    if len(data.data_shape) == 1:
        stats = _stats(None, data.x.numpy())
        provenance = {"source": _lmm_source(name, split, stats.n), "sha256": None, "data_sha256": None, "n": stats.n}
        return Reference(stats, None, "fd_points", name, seed, provenance)
    features = cfg["eval"]["features"]
    extractor = get_extractor(features, device, progress=cfg["run"]["progress"] and dist.is_main())
    images = data.uint8_nhwc()
    data_hash = hash_images(images)
    if cache is not None and cache.is_file():
        stats = load_stats(cache, extractor, data_hash)
    else:
        stats = _stats(extractor, images)
        if cache is not None and dist.is_main():
            save_stats(cache, stats, {"data": cfg["data"], "split": split}, extractor=extractor, data_hash=data_hash)
    provenance = {"source": _lmm_source(name, split, stats.n),
                  "sha256": file_sha256(cache) if cache is not None and cache.is_file() else None,
                  "data_sha256": data_hash, "n": stats.n}
    return Reference(stats, extractor, DISTANCE_KEYS[features], name, seed, provenance)


def reference_file(path: Path, features: str, device: torch.device, *, seed: int, progress: bool = True) -> Reference:
    """Reference from a statistics file alone, without reading the dataset: one written by
    lmm.metrics.save_stats (`lmm eval --ref-cache`, RUN/reference-*.npz), refused if made by another extractor,
    implementation or network file; or one of EDM's fid.py `ref` (mu, sigma of Inception-v3 pool3 features, no
    count), accepted with `features` "inception" only. `seed` draws the precision/recall subsets (see `Reference`)."""
    if not path.is_file():
        raise FileNotFoundError(f"--ref {path}: no such statistics file")
    edm = is_edm_stats(path)
    if edm and features != "inception":
        raise ValueError(f"--ref {path}: an EDM reference file (mu, sigma of Inception-v3 pool3 features) needs "
                         f"eval.features=inception, not {features!r}")
    extractor = get_extractor(features, device, progress=progress)
    provenance = {"sha256": file_sha256(path)}
    if edm:
        stats = load_edm_stats(path, extractor.dim)
        provenance.update(source=f"file {path} (EDM layout: mu, sigma; count not recorded)", data_sha256=None)
    else:
        stats = load_stats(path, extractor)
        meta = read_meta(path)
        made = (_lmm_source(meta["data"]["name"], meta["split"], stats.n)
                if isinstance(meta.get("data"), dict) and "name" in meta["data"] and "split" in meta
                else f"lmm statistics, n {stats.n}")
        provenance.update(source=f"file {path} ({made})", data_sha256=meta["data_hash"])
    provenance["n"] = stats.n
    return Reference(stats, extractor, DISTANCE_KEYS[features], str(path), seed, provenance)


def score(ref: Reference, samples: np.ndarray) -> dict[str, Any]:
    """Frechet distance (under ref.key) of samples against the reference, and precision/recall (None when the
    reference kept no features) with k = PR_K on equal numbers m = min(N real, M generated) of each: the larger
    set is cut to a random subset drawn with ref.seed (the real one cached per m); "precision_recall" records
    which features, k and counts were used."""
    fake = _stats(ref.extractor, samples)
    row: dict[str, Any] = {ref.key: frechet_distance_stats(ref.stats, fake), "precision": None, "recall": None,
                           "precision_recall": None}
    if ref.stats.features is not None:
        m = min(ref.stats.n, fake.n)
        idx, radii = ref.real_subset(m)
        pr = precision_recall(ref.stats.features[idx], fake.features[subset_indices(fake.n, m, ref.seed)], k=PR_K,
                              real_radii=radii)
        row.update(pr, precision_recall={"features": ref.features_name, "k": PR_K, "n_real": m, "n_fake": m})
    return row


def _reduces_to_euler(solver: str, steps: int, singular_end: bool) -> bool:
    """One Heun/RK4 step into a singular end is an Euler step; DPM-Solver++(2M/3M) is first order on its first and
    last steps, so with 1 or 2 steps it is Euler."""
    return (solver in ("heun", "rk4") and singular_end and steps == 1) or (solver in DPM_METHODS and steps <= 2)


def sweep(model: torch.nn.Module | Teacher, nfes: list[int], student_grid: list[float],
          teacher_solvers: list[str] = ("euler",)) -> list[dict[str, Any]]:
    """Sampler settings per NFE. Teachers: each of `teacher_solvers` with the most steps that fit in k NFE
    (`steps_within`) on the trimmed schedule (no call spent at sigma_min), skipping a solver where it would
    repeat Euler's row; students: `student_grid` when k equals its length, lmm.sampling.default_grid(k) otherwise."""
    if not isinstance(model, Teacher):
        return [{"solver": "lines", "grid": grid_for(k, student_grid)} for k in nfes]
    rows: list[dict[str, Any]] = []
    for k in nfes:
        for solver in teacher_solvers:
            steps = steps_within(solver, k, model.singular_end)
            how = {"solver": solver, "steps": steps, "schedule": "trimmed"}
            if steps and not _reduces_to_euler(solver, steps, model.singular_end) and how not in rows:
                rows.append(how)
    return rows


def pair_sampler(run: Path, teacher_meta: dict) -> dict[str, Any]:
    """The sampler that made RUN/pairs (its manifest), else the teacher file's own: {"solver", "steps", "schedule"}."""
    manifest = run / "pairs" / "manifest.json"
    own = json.loads(manifest.read_text()) if manifest.is_file() else teacher_meta["teacher"]
    return {"solver": own["solver"], "steps": own["steps"], "schedule": own.get("schedule", "edm")}


class _LineEndpoint(nn.Module):
    """A teacher as an endpoint predictor on the line: (x_t (B, ...), t (B,), y) -> Teacher.line_endpoint.
    Starts in the teacher's train/eval mode, so that lmm.sampling.sample_lines restores the teacher's."""

    def __init__(self, teacher: Teacher) -> None:
        super().__init__()
        self.teacher = teacher
        self.train(teacher.training)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.teacher.line_endpoint(x_t, t, y)


@torch.no_grad()
def own_ode_metrics(model: nn.Module | Teacher, *, seed: int, device: torch.device) -> dict[str, float]:
    """Straightness and endpoint consistency of the model's own ODE dx/dt = (N(x_t, t) - x_t) / (1 - t), with N
    its endpoint prediction on the line x_t = (1-t) z + t x1 (a student: the model; a teacher:
    Teacher.line_endpoint), from x_0 = z at t = 0 to t = 1: OWN_ODE_STEPS Euler steps on the uniform grid
    k / OWN_ODE_STEPS (lmm.sampling.sample_lines) from STRAIGHTNESS_BATCH seeded noises z.

    Returns {"straightness" (lmm.metrics.straightness of the OWN_ODE_STEPS + 1 states at times k / OWN_ODE_STEPS
    and 1), "endpoint_drift", "endpoint_to_final" (lmm.metrics.endpoint_consistency of the OWN_ODE_STEPS
    predictions N_k)}: properties of the model alone, whatever sampler a row uses."""
    inner = model.model if isinstance(model, Teacher) else model
    z, y = next(noise_batches(STRAIGHTNESS_BATCH, STRAIGHTNESS_BATCH, tuple(inner.data_shape), inner.num_classes, seed))
    z, y = z.to(device), None if y is None else y.to(device)
    grid = [k / OWN_ODE_STEPS for k in range(OWN_ODE_STEPS)]
    sol = sample_lines(_LineEndpoint(model) if isinstance(model, Teacher) else model, z, grid, y,
                       return_trajectory=True)
    times = torch.tensor([*grid, 1.0], dtype=torch.float64)
    return {"straightness": straightness([x.float().cpu() for x in sol.trajectory], times),
            **endpoint_consistency([x.float().cpu() for x in sol.endpoints], times[:-1])}


def evaluate_sampler(cfg: dict, ref: Reference, role: str, model: nn.Module | Teacher, how: dict[str, Any],
                     device: torch.device, own_ode: dict[str, float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample eval.n from eval.seed with the sampler `how` (see `sweep`); returns (metrics row, samples). The row
    carries `own_ode` (the model's `own_ode_metrics`, the same for every sampler of a model)."""
    e = cfg["eval"]
    start = time.perf_counter()
    out = sample(model, e["n"], seed=e["seed"], batch_size=e["batch_size"], bf16=use_bf16(cfg, device),
                 device=device, progress=cfg["run"]["progress"] and dist.is_main(),
                 compile=use_compile(cfg, device), **how)
    seconds = time.perf_counter() - start
    grid_name = " (edm grid)" if how.get("schedule") == "edm" else ""
    row = {"label": f"{role} {how['solver']} NFE {out['nfe']}{grid_name}", "model": role, "solver": how["solver"],
           "nfe": out["nfe"], "time_grid": how.get("grid"), **score(ref, out["images"]), "seconds": round(seconds, 2),
           **own_ode}
    return row, out


def _student_grid(meta: dict) -> list[float]:
    """The sampler grid a student model file was trained for (its objective's `grid`); [] for a teacher."""
    return list(meta["objective_kwargs"].get("grid", ())) if meta["role"] == "student" else []


def _description(ref: Reference) -> str:
    """How the metrics of a row are measured (the counts aside)."""
    return (f"{ref.key}: Frechet distance on {ref.features_name} features against {ref.provenance['source']}; "
            f"precision/recall (Kynkaanniemi et al.) with k={PR_K} on the same features, on equal "
            f"numbers of real and generated samples (the larger set cut to a random subset, seed {ref.seed}; counts "
            f"in each row's precision_recall); straightness, endpoint_drift and endpoint_to_final: properties of "
            f"each model, not of the row's sampler, measured on {OWN_ODE_STEPS} Euler steps (grid k/{OWN_ODE_STEPS}) "
            f"of the model's own ODE dx/dt = (N(x_t, t) - x_t)/(1 - t) from {STRAIGHTNESS_BATCH} seeded noises, N "
            f"its endpoint prediction on the line x_t = (1-t) z + t x1 (teachers: their ODE mapped to the line): "
            f"straightness = mean_batch sum_k dt_k mean_dims ((x_1 - x_0) - (x_(k+1) - x_k)/dt_k)^2 (0 for a "
            f"straight path at constant speed), endpoint_drift = mean_batch sum_k mean_dims (N_(k+1) - N_k)^2 / dt_k "
            f"(the integral of |dN/dt|^2 per dimension; 0 when the prediction does not move), endpoint_to_final = "
            f"mean over k of the RMS distance of N_k to the last prediction.")


def teacher_best(rows: list[dict[str, Any]], key: str, budgets: list[int]) -> list[dict[str, Any]]:
    """For each NFE budget, the teacher row with the lowest `key` among those that spend at most that many NFE:
    [{"budget", "label", "nfe", key}], the teacher's best at each budget (budgets no row fits are left out)."""
    out = []
    for budget in budgets:
        fits = [r for r in rows if r["model"] == "teacher" and r["nfe"] <= budget]
        if fits:
            best = min(fits, key=lambda r: r[key])
            out.append({"budget": budget, "label": best["label"], "nfe": best["nfe"], key: best[key]})
    return out


def _row_key(role: str, how: dict[str, Any]) -> str:
    return json.dumps({"model": role, **how}, sort_keys=True)


def _settings(cfg: dict, ref: Reference, device: torch.device) -> dict[str, Any]:
    """The evaluation settings the rows of sampled models depend on (besides the model files); precision_recall
    gives the counts for eval.n samples (None when the reference kept no features)."""
    e = cfg["eval"]
    pr = None
    if ref.stats.features is not None:
        m = min(ref.stats.n, e["n"])
        pr = {"features": ref.features_name, "k": PR_K, "n_real": m, "n_fake": m}
    return {"features": ref.features_name, "feature_impl": ref.impl, "reference": ref.name,
            "reference_n": ref.stats.n, "n": e["n"], "seed": e["seed"], "bf16": use_bf16(cfg, device),
            "precision_recall": pr, "own_ode": {"solver": "euler", "steps": OWN_ODE_STEPS, "batch": STRAIGHTNESS_BATCH}}


def evaluate_run(cfg: dict, teacher_path: str | Path | None = None, student_path: str | Path | None = None) -> dict:
    """Sample the teacher (eval.teacher_solvers at eval.teacher_nfe, see `sweep`, and the sampler that made the
    pairs, `pair_sampler`) and the student
    (eval.student_nfe; the grid in its model file for its own NFE, lmm.sampling.default_grid otherwise) from the
    same seeded noise; write samples, grids and RUN_DIR/metrics.json. Each model's `own_ode_metrics` are
    computed once and stored in each of its rows, with the sha256 of its model file ("model_sha256"); the
    reference's provenance is metrics.json's "reference" (see `Reference`).

    metrics.json is rewritten after every row, and a rerun with the same models and eval settings keeps the
    rows already there, so an interrupted evaluation resumes. Reference statistics are cached in
    RUN_DIR/reference-FEATURES-SPLIT.npz (refused if the extractor, its implementation, network or data changed)."""
    e, run = cfg["eval"], run_dir(cfg)
    device = dist.init_distributed(cfg["run"]["device"], deterministic=cfg["run"]["deterministic"]).device
    teacher_path = Path(teacher_path or run / "teacher" / "model.safetensors")
    student_path = Path(student_path or run / "student" / "model.safetensors")
    ref = reference(cfg, device, reference_cache(cfg))

    teacher, tmeta = load_model(teacher_path, device)
    student, smeta = load_model(student_path, device)
    runs: list[tuple[str, Any, dict[str, Any]]] = [
        ("teacher", teacher, how) for how in sweep(teacher, e["teacher_nfe"], [], e["teacher_solvers"])]
    own = pair_sampler(run, tmeta)
    if own not in [how for _, _, how in runs]:
        runs.append(("teacher", teacher, own))
    runs += [("student", student, how) for how in sweep(student, e["student_nfe"], _student_grid(smeta))]

    settings = {**_settings(cfg, ref, device), "teacher_sha256": file_sha256(teacher_path),
                "student_sha256": file_sha256(student_path)}
    metrics = {
        "distance_key": ref.key,
        "features": ref.features_name,
        "reference": ref.provenance,
        "description": f"{e['n']} samples per row, noise seed {e['seed']}. {_description(ref)}",
        "teacher": str(teacher_path), "student": str(student_path), "settings": settings, "results": [],
    }
    path = run / "metrics.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    done = {r["key"]: r for r in old.get("results", []) if "key" in r} if old.get("settings") == settings else {}
    keys = [_row_key(role, how) for role, _, how in runs]
    model_sha = {"teacher": settings["teacher_sha256"], "student": settings["student_sha256"]}
    rows = {k: {**done[k], "model_sha256": model_sha[role]} for k, (role, _, _) in zip(keys, runs) if k in done}
    own_ode: dict[str, dict[str, float]] = {}
    # the pair sampler's row and the student's first (the comparison that matters), then the teacher's sweep
    first = [i for i, (role, _, how) in enumerate(runs) if role == "student" or how == own]
    for i in first + [i for i in range(len(runs)) if i not in first]:
        (role, model, how), key = runs[i], keys[i]
        if key in rows:
            continue
        if role not in own_ode:
            own_ode[role] = own_ode_metrics(model, seed=e["seed"], device=device)
        row, out = evaluate_sampler(cfg, ref, role, model, how, device, own_ode[role])
        slug = "".join(c if c.isalnum() or c in "+-." else "_" for c in row["label"].lower())
        row["grid"], row["key"], row["model_sha256"] = None, key, model_sha[role]
        if dist.is_main():
            save_samples(out, run / "samples" / f"{slug}.npz")
            row["grid"] = f"samples/{slug}.png" if out["images"].ndim == 4 else None
        rows[key] = row
        metrics["results"] = [rows[k] for k in keys if k in rows]
        if dist.is_main():
            save_json(path, metrics)
    metrics["results"] = [rows[k] for k in keys]
    metrics["teacher_best"] = teacher_best(metrics["results"], ref.key, e["teacher_nfe"])
    if dist.is_main():
        save_json(path, metrics)
    return metrics


def load_samples(path: str | Path) -> np.ndarray:
    """The `images` of a sample file from `lmm sample`: uint8 (N, H, W, C), or float (N, D) for vector data.
    Anything else raises ValueError naming the file."""
    expected = "an .npz from lmm sample with 'images' uint8 N x H x W x C (float N x D for vector data)"
    if not Path(path).is_file():
        raise FileNotFoundError(f"sample file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz file; expected {expected}")
    try:
        with np.load(path, allow_pickle=False) as f:
            images = f["images"] if "images" in f else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: unreadable .npz ({err}); expected {expected}") from None
    if images is None:
        raise ValueError(f"{path}: no 'images' array; expected {expected}")
    ok = (images.ndim == 4 and images.dtype == np.uint8 and images.shape[-1] in (1, 3)) or (
        images.ndim == 2 and images.dtype.kind == "f")
    if not ok:
        raise ValueError(f"{path}: 'images' is {images.dtype} {images.shape}; expected {expected}")
    if images.shape[0] < 2:
        raise ValueError(f"{path}: holds {images.shape[0]} image(s); a Frechet distance needs at least 2")
    return images


def _check_sample_shape(path: Path, images: np.ndarray, data: ImageData) -> None:
    """Refuse (ValueError naming the file and both shapes) samples (N, H, W, C) or (N, D) whose items differ in
    shape from those of `data` (C, H, W) or (D,)."""
    want = data.data_shape if len(data.data_shape) == 1 else tuple(data.data_shape[i] for i in (1, 2, 0))
    if tuple(images.shape[1:]) != want:
        what = "(D,)" if len(want) == 1 else "(H, W, C)"
        raise ValueError(f"{path}: samples have shape {tuple(images.shape[1:])} but data {data.name} has {want} "
                         f"{what}; pass the preset the samples were made with (-c ...) or set data.name")


def evaluate_inputs(cfg: dict, *, samples: list[Path] = (), model: Path | None = None, nfes: list[int] = (),
                    cache: Path | None = None, ref_file: Path | None = None) -> dict:
    """`lmm eval`: score sample files (.npz with `images`) and/or a model sampled at each NFE in `nfes`
    (see `sweep`; a student's own grid from its model file) against the dataset of cfg["data"] (split eval.split;
    statistics cached in `cache`; sample files must match its item shape) or, given `ref_file`, against that
    statistics file alone (see `reference_file`); with eval.features, eval.n samples and eval.seed. Returns the
    rows (a model's carry its "model_sha256", lmm.io.path_sha256 of its file) with the settings, a description
    and the reference's provenance ("reference", see `Reference`), as in metrics.json."""
    e = cfg["eval"]
    device = dist.init_distributed(cfg["run"]["device"], deterministic=cfg["run"]["deterministic"]).device
    if ref_file is not None and cache is not None:
        raise ValueError("lmm eval: give --ref (a statistics file alone) or --ref-cache (dataset + cache), not both")
    progress = cfg["run"]["progress"] and dist.is_main()
    sample_sets = [(path, load_samples(path)) for path in samples]
    data = eval_data(cfg) if ref_file is None else None
    if data is not None:
        for path, images in sample_sets:
            _check_sample_shape(path, images, data)
    net, meta = load_model(model, device) if model is not None else (None, None)
    ref = reference(cfg, device, cache, data) if ref_file is None else reference_file(
        ref_file, e["features"], device, seed=e["seed"], progress=progress)
    settings = _settings(cfg, ref, device)
    rows = []
    for path, images in sample_sets:
        rows.append({"label": str(path), "model": "file", **score(ref, images)})
    if model is not None:
        model_sha = path_sha256(model_path(Path(model)))
        settings["model_sha256"] = model_sha
        own_ode = own_ode_metrics(net, seed=e["seed"], device=device)
        rows += [{**evaluate_sampler(cfg, ref, meta["role"], net, how, device, own_ode)[0], "model_sha256": model_sha}
                 for how in sweep(net, list(nfes), _student_grid(meta), e["teacher_solvers"])]
    return {"distance_key": ref.key, "features": ref.features_name, "reference": ref.provenance,
            "description": _description(ref), "settings": settings, "results": rows}

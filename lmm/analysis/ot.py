"""The curse of dimensionality of mini-batch optimal-transport pairing (what OT-CFM relies on).

Ground truth: the closed-form OT (Monge) map between two Gaussians. A batch of B noises z ~ N(0, I_d) and B
independent data x ~ N(m, S) is matched exactly (lmm.couplings.ot_permutation); the pairing error is how far each
noise's partner lies from its true image T(z), relative to independent pairing. The batch needed for a fixed error
grows with d; `growth_fit` measures how fast. On a pair store the teacher's deterministic map z -> x1 is the
reference coupling, and `pair_store_coupling` asks how much of it mini-batch OT recovers.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lmm.couplings import matched_cost, ot_permutation
from lmm.io import atomic_write_text, save_json

DEFAULT_DIMS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_BATCHES = tuple(2**k for k in range(1, 12))
DEFAULT_THRESHOLDS = (0.5,)
EIGEN_RANGE = (0.1, 2.0)
LOAD_PER_BATCH = 8


def _generator(*key: int) -> torch.Generator:
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def sym_sqrt(S: Tensor, inverse: bool = False) -> Tensor:
    """Square root (or inverse square root) of a symmetric PSD matrix S (d, d) by eigh, float64 (d, d)."""
    S = torch.as_tensor(S, dtype=torch.float64)
    vals, vecs = torch.linalg.eigh((S + S.T) / 2)
    vals = vals.clamp_min(0)
    root = vals.rsqrt() if inverse else vals.sqrt()
    return (vecs * root) @ vecs.T


def gaussian_ot_map(m1: Tensor, S1: Tensor, m2: Tensor, S2: Tensor) -> tuple[Tensor, Tensor]:
    """The OT (Monge) map T(x) = A x + b from N(m1, S1) to N(m2, S2) under squared Euclidean cost.

    m1, m2: (d,); S1, S2: (d, d) symmetric positive definite. Returns A (d, d) symmetric PSD (T is the gradient
    of the convex x^T A x / 2 + b^T x), A = S1^{-1/2} (S1^{1/2} S2 S1^{1/2})^{1/2} S1^{-1/2}, and b = m2 - A m1 (d,),
    all float64.
    """
    m1, m2 = (torch.as_tensor(m, dtype=torch.float64).flatten() for m in (m1, m2))
    S1, S2 = (torch.as_tensor(S, dtype=torch.float64) for S in (S1, S2))
    d = m1.numel()
    if m2.numel() != d or S1.shape != (d, d) or S2.shape != (d, d):
        raise ValueError(f"gaussian_ot_map: shapes m1 {tuple(m1.shape)}, S1 {tuple(S1.shape)}, m2 {tuple(m2.shape)}, "
                         f"S2 {tuple(S2.shape)} do not describe two Gaussians of one dimension")
    r1, r1_inv = sym_sqrt(S1), sym_sqrt(S1, inverse=True)
    A = r1_inv @ sym_sqrt(r1 @ S2 @ r1) @ r1_inv
    A = (A + A.T) / 2
    return A, m2 - A @ m1


def random_gaussian(d: int, seed: int, eigen_range: tuple[float, float] = EIGEN_RANGE) -> tuple[Tensor, Tensor]:
    """A seeded data Gaussian in dimension d: mean m (d,) ~ N(0, I) and covariance S = Q diag(lambda) Q^T (d, d) with
    eigenvalues log-uniform in eigen_range and Q a uniformly random rotation; float64."""
    g = _generator(seed, d, 0)
    m = torch.randn(d, generator=g, dtype=torch.float64)
    lo, hi = (math.log(v) for v in eigen_range)
    lam = torch.exp(lo + (hi - lo) * torch.rand(d, generator=g, dtype=torch.float64))
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return m, (q * lam) @ q.T


def pairing_error(d: int, batch: int, repeats: int, seed: int) -> dict[str, float]:
    """Mini-batch OT pairing error of noise N(0, I_d) with the data Gaussian `random_gaussian(d, seed)`.

    Each repeat draws z (batch, d) ~ N(0, I) and independent x (batch, d) ~ N(m, S), matches them with
    ot_permutation and scores mean_i ||x_perm(i) - T(z_i)||^2 / (2 tr S), T the exact OT map: 2 tr S is
    E||x - T(z)||^2 for independent x, so independent pairing scores ~1 and the exact OT plan 0.
    Returns {"error": mean over repeats, "error_std": their std, "independent": the same score of the
    unmatched pairs (z_i, x_i)}.
    """
    m, S = random_gaussian(d, seed)
    A, b = gaussian_ot_map(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64), m, S)
    root, scale = sym_sqrt(S), 2 * torch.trace(S).item()
    g = _generator(seed, d, batch)
    errors, independent = [], []
    for _ in range(repeats):
        z = torch.randn(batch, d, generator=g, dtype=torch.float64)
        x = m + torch.randn(batch, d, generator=g, dtype=torch.float64) @ root
        target = z @ A + b
        perm = ot_permutation(z, x)
        errors.append(matched_cost(x[perm], target).mean().item() / scale)
        independent.append(matched_cost(x, target).mean().item() / scale)
    e = torch.tensor(errors, dtype=torch.float64)
    return {"error": e.mean().item(), "error_std": e.std().item() if repeats > 1 else 0.0,
            "independent": sum(independent) / repeats}


def repeats_for(batch: int, batches: list[int], repeats: int) -> int:
    """Batches drawn at size `batch`: `repeats` at the largest of `batches`, more at smaller sizes so that every
    cell averages over at least repeats * max(batches) pairs."""
    return max(repeats, math.ceil(repeats * max(batches) / batch))


def gaussian_pairing_grid(dims: list[int], batches: list[int], repeats: int, seed: int,
                          log: Any = None) -> list[dict[str, Any]]:
    """`pairing_error` for every (d, batch), each over `repeats_for(batch, batches, repeats)` batches:
    rows {"d", "batch", "repeats", "error", "error_std", "independent", "seconds"}."""
    rows = []
    for d in dims:
        for batch in batches:
            start = time.perf_counter()
            k = repeats_for(batch, batches, repeats)
            row = {"d": d, "batch": batch, "repeats": k, **pairing_error(d, batch, k, seed)}
            row["seconds"] = round(time.perf_counter() - start, 3)
            rows.append(row)
        if log is not None:
            log(f"d={d}: " + " ".join(f"{r['batch']}:{r['error']:.3f}" for r in rows if r["d"] == d))
    return rows


def needed_batch(batches: list[int], errors: list[float], threshold: float) -> dict[str, Any]:
    """The batch size at which the error first falls to `threshold`, from errors (K,) measured at increasing
    batches (K,): log B interpolated linearly in the error between the last grid point above the threshold and the
    first at or below it. Returns {"batch": float or None (not reached on the grid), "bound": "at_most" when the
    first grid point is already at or below it (then "batch" is that point), else None}."""
    if len(batches) != len(errors) or not batches:
        raise ValueError(f"needed_batch: {len(batches)} batches and {len(errors)} errors")
    for k, (b, e) in enumerate(zip(batches, errors)):
        if e <= threshold:
            if k == 0:
                return {"batch": float(b), "bound": "at_most"}
            b0, e0 = batches[k - 1], errors[k - 1]
            w = (e0 - threshold) / (e0 - e)
            return {"batch": math.exp(math.log(b0) + w * (math.log(b) - math.log(b0))), "bound": None}
    return {"batch": None, "bound": None}


def _lstsq(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """(intercept, slope, RMS residual) of the least-squares line y = a + s x."""
    X = np.stack([np.ones(len(x)), np.asarray(x, dtype=np.float64)], 1)
    Y = np.asarray(y, dtype=np.float64)
    (a, s), *_ = np.linalg.lstsq(X, Y, rcond=None)
    return float(a), float(s), float(np.sqrt(np.mean((X @ np.array([a, s]) - Y) ** 2)))


def growth_fit(dims: list[int], needed: list[float | None], unreached: list[int] = ()) -> dict[str, Any]:
    """How the needed batch grows with dimension, from dims (K,) and needed batches (K,) (None: left out of the fit).

    Fits log B = a + r d (exponential) and log B = a + p log d (power law) by least squares on the points with a
    value; each fit's RMS residual is in log B. Growth is called at least exponential when r > 0 and the
    exponential fit's residual is no larger than the power law's. `unreached` (dimensions whose threshold the grid
    never reached) get the exponential fit's prediction in "predicted_unreached". Fits need >= 2 dimensions.
    """
    pts = [(d, b) for d, b in zip(dims, needed) if b is not None]
    out: dict[str, Any] = {"points": len(pts), "dims_used": [d for d, _ in pts], "unreached_dims": list(unreached),
                           "exponential": None, "power": None, "at_least_exponential": None,
                           "predicted_unreached": {}}
    if len({d for d, _ in pts}) < 2:
        return out
    ds, logb = [float(d) for d, _ in pts], [math.log(b) for _, b in pts]
    a, r, res = _lstsq(ds, logb)
    out["exponential"] = {"a": a, "r": r, "growth_per_dim": math.exp(r), "rms_residual_log": res}
    if all(d > 0 for d in ds):
        ap, p, resp = _lstsq([math.log(d) for d in ds], logb)
        out["power"] = {"a": ap, "p": p, "rms_residual_log": resp}
    power_res = out["power"]["rms_residual_log"] if out["power"] else math.inf
    out["at_least_exponential"] = bool(r > 0 and res <= power_res)
    out["predicted_unreached"] = {str(d): math.exp(a + r * d) for d in unreached}
    return out


def _pool(x: Tensor, res: int, noise: bool) -> Tensor:
    """Average-pool (N, C, H, W) to (N, C, res, res); pooled noise is multiplied by the pooling factor so that it
    keeps unit variance."""
    k = x.shape[-1] // res
    if k == 1:
        return x
    out = F.avg_pool2d(x, k)
    return out * k if noise else out


def _check_resolutions(shape: tuple[int, ...], resolutions: list[int], where: str) -> None:
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"--resolutions: {where} holds data of shape {shape}, not square images (C, H, H)")
    bad = [r for r in resolutions if r < 1 or shape[1] % r]
    if bad:
        raise ValueError(f"--resolutions {','.join(map(str, bad))}: must divide the resolution {shape[1]} of {where} "
                         f"(e.g. {','.join(map(str, default_resolutions(shape)))})")


def default_resolutions(shape: tuple[int, ...]) -> list[int]:
    """The store's resolution and its halvings down to 4 pixels (square images), else [] (vectors)."""
    if len(shape) != 3 or shape[1] != shape[2]:
        return []
    out, r = [], shape[1]
    while r >= 4 and shape[1] % r == 0:
        out.append(r)
        if r % 2:
            break
        r //= 2
    return out


def check_pair_store(store: str | Path, batches: list[int], resolutions: list[int] | None) -> None:
    """Refuse, before any work, a pair store that `pair_store_coupling` could not read or score at every batch size:
    an incomplete store, `resolutions` that do not divide its resolution, or batches larger than its pairs."""
    from lmm.pairs import open_pairs

    pairs = open_pairs(store, verify=False)
    if resolutions:
        _check_resolutions(pairs.data_shape, resolutions, str(store))
    n = len(pairs)
    big, fit = [b for b in batches if b > n], [b for b in batches if b <= n]
    if big:
        raise ValueError(f"--batches {','.join(map(str, big))}: larger than the {n} pairs in {store}; with --pairs "
                         f"every batch size must be at most {n}" + (f" (e.g. --batches {','.join(map(str, fit))})"
                                                                      if fit else ""))


def pair_store_coupling(store: str | Path, batches: list[int], repeats: int, seed: int,
                        resolutions: list[int] | None = None, log: Any = None) -> dict[str, Any]:
    """How much of a teacher's deterministic coupling z -> x1 (a pair store of `lmm pairs`) mini-batch OT recovers.

    For each resolution r (images (C, H, H) average-pooled to (C, r, r), pooled noise times H/r; None: the store's
    resolution and its halvings, `default_resolutions`; vectors are used as they are) and batch B (at most the
    store's size), each of `repeats_for(B, batches that fit, repeats)` batches takes B distinct pairs (the same ones
    at every resolution), matches the B noises to the B endpoints with ot_permutation and scores "own_fraction" =
    the fraction of noises matched to their own endpoint (independent pairing: 1/B) and "relative_error" =
    mean_i ||x1_perm(i) - x1_i||^2 / mean_{i != j} ||x1_i - x1_j||^2 (independent pairing: (B-1)/B), both at the
    pooled resolution; and, when 2B pairs fit, "independent_error": the same relative error when the B noises are
    matched instead to the endpoints x1'_j of B other pairs (data drawn independently of the noises, as OT-CFM
    pairs them), mean_i ||x1'_perm(i) - x1_i||^2 / (mean over i != j of all pairs read) (unmatched: 1), i.e. the
    Gaussian experiment's error with the teacher's map as the reference. At most LOAD_PER_BATCH * max(batches) pairs are
    read (the first shards; pairs are i.i.d.). Returns {"store", "n_pairs" (pairs read), "data_shape",
    "resolutions", "skipped_batches", "rows": [{"resolution", "dims", "batch", "repeats", "own_fraction",
    "relative_error", "independent_error" and their "*_std"}]}.
    """
    from lmm.pairs import open_pairs

    pairs = open_pairs(store)
    shape = pairs.data_shape
    if resolutions is None:
        resolutions = default_resolutions(shape)
    elif resolutions:
        _check_resolutions(shape, resolutions, str(store))
    limit, zs_, xs_ = LOAD_PER_BATCH * max(batches), [], []
    for _, shard in pairs.iter_shards():
        zs_.append(shard["z"].double())
        xs_.append(shard["x1"].double())
        if sum(len(t) for t in zs_) >= limit:
            break
    z, x1 = torch.cat(zs_)[:limit], torch.cat(xs_)[:limit]
    n = z.shape[0]
    fits = [b for b in batches if b <= n]
    levels: list[tuple[int | None, Tensor, Tensor]] = (
        [(r, _pool(z, r, True), _pool(x1, r, False)) for r in resolutions] if resolutions else [(None, z, x1)])
    rows = []
    for batch in fits:
        g = _generator(seed, batch, 1)
        k = repeats_for(batch, fits, repeats)
        draws = [torch.randperm(n, generator=g) for _ in range(k)]
        for res, zs, xs in levels:
            start = time.perf_counter()
            flat = xs.flatten(1)
            spread = 2 * n / (n - 1) * flat.var(0, correction=0).sum().item()
            stats: dict[str, list[float]] = {"own_fraction": [], "relative_error": [], "independent_error": []}
            for order in draws:
                zb, xb = zs[order[:batch]].flatten(1), xs[order[:batch]].flatten(1)
                sq = xb.square().sum(1)
                pair_mean = max(((2 * batch * sq.sum() - 2 * xb.sum(0).square().sum()) /
                                 (batch * (batch - 1))).item(), 1e-300)
                perm = ot_permutation(zb, xb)
                stats["own_fraction"].append((perm == torch.arange(batch)).double().mean().item())
                stats["relative_error"].append(matched_cost(xb[perm], xb).mean().item() / pair_mean)
                if 2 * batch <= n:
                    other = xs[order[batch:2 * batch]].flatten(1)
                    stats["independent_error"].append(
                        matched_cost(other[ot_permutation(zb, other)], xb).mean().item() / max(spread, 1e-300))
            row: dict[str, Any] = {"resolution": res, "dims": int(zs[0].numel()), "batch": batch, "repeats": k}
            for key, values in stats.items():
                v = torch.tensor(values, dtype=torch.float64)
                row[key] = v.mean().item() if values else None
                row[f"{key}_std"] = v.std().item() if len(values) > 1 else (0.0 if values else None)
            row["seconds"] = round(time.perf_counter() - start, 3)
            rows.append(row)
        if log is not None:
            log(f"pairs B={batch}: " + " ".join(
                f"r{r['resolution']}:{r['own_fraction']:.3f}/{r['relative_error']:.3f}/{_fmt(r['independent_error'])}"
                for r in rows if r["batch"] == batch))
    return {"store": str(store), "n_pairs": n, "data_shape": list(shape), "resolutions": list(resolutions),
            "skipped_batches": [b for b in batches if b > n], "rows": rows}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows])


def markdown(result: dict[str, Any]) -> str:
    """The analysis as markdown tables: error per (d, B), needed batch per d and threshold with the fits, and the
    pair store's coupling per (resolution, B)."""
    g = result["gaussian"]
    dims, batches = g["dims"], g["batches"]
    err = {(r["d"], r["batch"]): r["error"] for r in g["rows"]}
    pairs = g["repeats"] * max(batches)
    parts = [f"Pairing error (1 = independent pairing, 0 = exact OT map), mean over >= {pairs} pairs per cell "
             f"({g['repeats']} batches at B = {max(batches)}, more at smaller B):\n",
             _md_table(["d \\ B", *map(str, batches)], [[d, *(err[d, b] for b in batches)] for d in dims])]
    for t in g["thresholds"]:
        need = t["needed"]
        parts += [f"\nBatch needed for error <= {t['threshold']} (log-linear interpolation; '<=' = already at the "
                  "smallest batch, '-' = not reached):\n",
                  _md_table(["d", "needed B"], [[d, "-" if n["batch"] is None else
                                                 ("<= " if n["bound"] else "") + _fmt(n["batch"])]
                                                for d, n in zip(dims, need)])]
        fit = t["fit"]
        if fit["exponential"]:
            e, p = fit["exponential"], fit["power"]
            parts.append(f"\nFit on d = {fit['dims_used']}: log B = {e['a']:.3g} + {e['r']:.3g} d, growth x"
                         f"{e['growth_per_dim']:.3g} per dimension (RMS residual {e['rms_residual_log']:.3g} in log B)"
                         + (f"; power law log B = {p['a']:.3g} + {p['p']:.3g} log d (RMS residual "
                            f"{p['rms_residual_log']:.3g})" if p else "")
                         + f". At least exponential: {fit['at_least_exponential']}.")
        else:
            parts.append(f"\nToo few dimensions reached the threshold for a fit ({fit['points']}).")
    if result.get("pairs"):
        pr = result["pairs"]
        parts += [f"\nTeacher coupling in {pr['store']} ({pr['n_pairs']} pairs) recovered by mini-batch OT (own "
                  "endpoint fraction: independent pairing gives 1/B; relative error: independent pairing gives "
                  "(B-1)/B; error vs independent endpoints: the noises matched to the endpoints of B other pairs, "
                  "scored against their own teacher endpoints, unmatched ~1):\n",
                  _md_table(["resolution", "dims", "B", "batches", "own endpoint fraction", "1/B", "relative error",
                             "error vs independent endpoints"],
                            [[r["resolution"] or "-", r["dims"], r["batch"], r["repeats"], r["own_fraction"],
                              1 / r["batch"], r["relative_error"], r["independent_error"]] for r in pr["rows"]])]
    return "\n".join(parts) + "\n"


def _plots(result: dict[str, Any]) -> dict[str, str]:
    from lmm.report import svg_plot

    g = result["gaussian"]
    plots = {"ot_error.svg": svg_plot({f"d={d}": [(r["batch"], r["error"]) for r in g["rows"] if r["d"] == d]
                                       for d in g["dims"]}, "batch size B", "pairing error", logx=True, logy=True)}
    series: dict[str, list[tuple[float, float]]] = {}
    for t in g["thresholds"]:
        pts = [(d, n["batch"]) for d, n in zip(g["dims"], t["needed"]) if n["batch"] is not None]
        series[f"needed, error<={t['threshold']}"] = pts
        e = t["fit"]["exponential"]
        if e:
            series[f"exp fit x{e['growth_per_dim']:.3g}/dim"] = [
                (d, math.exp(e["a"] + e["r"] * d)) for d in t["fit"]["dims_used"]]
    plots["ot_needed.svg"] = svg_plot(series, "dimension d", "batch needed", logy=True)
    if result.get("pairs") and result["pairs"]["rows"]:
        rows = result["pairs"]["rows"]
        res = sorted({r["resolution"] or 0 for r in rows}, reverse=True)
        by_res = {r: [x for x in rows if (x["resolution"] or 0) == r] for r in res}

        def name(r: int) -> str:
            return f"{r}x{r}" if r else "full"

        def curve(key: str, r: int) -> list[tuple[float, float]]:
            return [(x["batch"], x[key]) for x in by_res[r] if x[key] is not None]

        plots["ot_pairs.svg"] = svg_plot(
            {**{f"own fraction {name(r)}": curve("own_fraction", r) for r in res},
             **{f"rel. error {name(r)}": curve("relative_error", r) for r in res}},
            "batch size B", "fraction / relative error", logx=True)
        plots["ot_pairs_independent.svg"] = svg_plot(
            {f"{name(r)}": curve("independent_error", r) for r in res},
            "batch size B", "error vs independent endpoints", logx=True, logy=True)
    return {k: v for k, v in plots.items() if v}


def run_ot_analysis(out: str | Path, *, dims: list[int] = DEFAULT_DIMS, batches: list[int] = DEFAULT_BATCHES,
                    repeats: int = 4, thresholds: list[float] = DEFAULT_THRESHOLDS, seed: int = 0,
                    pairs: str | Path | None = None, resolutions: list[int] | None = None,
                    log: Any = None) -> dict[str, Any]:
    """The whole OT analysis into folder `out`: ot.json (every number), ot.md (tables), ot_error.svg (error against
    B per d), ot_needed.svg (needed B against d with the exponential fit) and, with a pair store, ot_pairs.svg (own
    fraction and relative error against B) and ot_pairs_independent.svg.
    Every argument, the pair store included (`check_pair_store`), is checked before any work.
    Returns the JSON's content, whose "markdown" holds ot.md's text."""
    dims, batches = sorted(set(dims)), sorted(set(batches))
    if not dims or dims[0] < 1:
        raise ValueError(f"--dims must be positive integers, got {dims}")
    if not batches or batches[0] < 2:
        raise ValueError(f"--batches must be integers >= 2, got {batches}")
    if repeats < 1:
        raise ValueError(f"--repeats must be a positive integer, got {repeats}")
    if not thresholds or any(not 0 < t < 1 for t in thresholds):
        raise ValueError(f"--threshold values must lie in (0, 1), got {list(thresholds)}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if pairs is not None:
        check_pair_store(pairs, batches, resolutions)
    start = time.perf_counter()
    rows = gaussian_pairing_grid(dims, batches, repeats, seed, log)
    per_d = {d: [r["error"] for r in rows if r["d"] == d] for d in dims}
    thr = []
    for t in sorted(set(thresholds)):
        need = [needed_batch(batches, per_d[d], t) for d in dims]
        fit = growth_fit(dims, [n["batch"] if n["bound"] is None else None for n in need],
                         [d for d, n in zip(dims, need) if n["batch"] is None])
        thr.append({"threshold": t, "needed": need, "fit": fit})
    result: dict[str, Any] = {
        "description": "Mini-batch OT pairing of noise N(0, I_d) with a data Gaussian N(m, S) (m ~ N(0, I), S with "
                       f"eigenvalues log-uniform in {list(EIGEN_RANGE)} and a random rotation, seeded per d): error = "
                       "mean_i ||x_perm(i) - T(z_i)||^2 / (2 tr S), T the closed-form OT map (1 = independent, "
                       "0 = exact). Needed batch: log-linear interpolation on the batch grid; the fits use the "
                       "dimensions whose threshold was crossed inside the grid (not at its first point).",
        "gaussian": {"dims": dims, "batches": batches, "repeats": repeats, "seed": seed, "rows": rows,
                     "thresholds": thr, "seconds": round(time.perf_counter() - start, 2)},
        "pairs": None,
    }
    if pairs is not None:
        t0 = time.perf_counter()
        result["pairs"] = pair_store_coupling(pairs, batches, repeats, seed, resolutions, log)
        result["pairs"]["seconds"] = round(time.perf_counter() - t0, 2)
    result["markdown"] = markdown(result)
    out.mkdir(parents=True, exist_ok=True)
    for name, svg in _plots(result).items():
        atomic_write_text(out / name, svg)
    atomic_write_text(out / "ot.md", result["markdown"])
    save_json(out / "ot.json", result)
    return result

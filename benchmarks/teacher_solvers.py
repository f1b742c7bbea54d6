"""Which sampler is the teacher's best at a given NFE? Accuracy and sample quality of its ODE solvers side by side.

For each sampler (solver, steps, schedule; see lmm.teachers.sample_teacher) of a trained run's teacher, from the
same seeded noise:
- `err`: relative RMS distance ||x - x_ref|| / ||x_ref|| of the samples to a reference solution of the same ODE
  (--ref, default DPM-Solver++(2M) with 256 steps on the trimmed grid, state kept in float64), on --err-n samples;
  `--ref heun:18:edm` makes it EDM's own sampler (35 NFE), to find pair samplers that reach its endpoints in fewer
  calls;
- the Frechet distance (eval.features of the run's config) of -n samples against the reference split, with
  precision/recall (-n 0: the error column only).
`--ema raw` samples the raw (non-averaged) weights of the teacher's last training checkpoint instead, to see what
the EMA changes; `--float64` keeps the solver state of the error column in float64 (the network still runs in float32);
`--sigma-min S` moves an EDM teacher's schedule end (its smallest nonzero sigma), to see what the network does there.
A sampler SOLVER:STEPS:SCHEDULE:RHO:SIGMA_MIN samples an EDM teacher on the rho-schedule with that RHO and SIGMA_MIN
(the reference keeps the teacher's own), to tune the pair sampler's grid.

    python benchmarks/teacher_solvers.py --run runs/fashion_mnist -c configs/fashion_mnist.toml -n 1000 \\
        --samplers euler:16:edm,heun:12:edm,heun:12:trimmed,dpm++2m:23:trimmed [KEY=VALUE ...] [--out F.json]
    python benchmarks/teacher_solvers.py --run runs/fashion_mnist -c configs/fashion_mnist.toml -n 0 --err-n 256 \
        --ref heun:18:edm --samplers dpm++2m:12:edm,dpm++2m:17:trimmed,dpm++3m:18:trimmed:10:0.006 [--teacher FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

import torch

from lmm.checkpoint import latest_checkpoint, load_checkpoint
from lmm.config import load_config
from lmm.evaluate import reference, reference_cache, score
from lmm.generate import noise_batches, sample
from lmm.models import load_model
from lmm.solvers import expected_nfe
from lmm.teachers import Teacher, sample_teacher


def parse_samplers(text: str) -> list[dict]:
    """"euler:16:edm,dpm++3m:18:trimmed:10:0.006" -> [{"solver": "euler", "steps": 16, "schedule": "edm"},
    {"solver": "dpm++3m", "steps": 18, "schedule": "trimmed", "rho": 10.0, "sigma_min": 0.006}]."""
    out = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) not in (3, 5):
            raise SystemExit(f"--samplers: {item!r} is not SOLVER:STEPS:SCHEDULE[:RHO:SIGMA_MIN]")
        how = {"solver": parts[0], "steps": int(parts[1]), "schedule": parts[2]}
        if len(parts) == 5:
            how.update(rho=float(parts[3]), sigma_min=float(parts[4]))
        out.append(how)
    return out


@contextlib.contextmanager
def grid_of(teacher: Teacher, how: dict) -> Iterator[dict]:
    """Inside: the teacher's rho / sigma_min are `how`'s (if it names them); yields the sample_teacher arguments."""
    saved = {k: getattr(teacher, k) for k in ("rho", "sigma_min") if k in how}
    if saved and not hasattr(teacher, "rho"):
        raise SystemExit(f"--samplers: RHO:SIGMA_MIN need an EDM teacher, not {type(teacher).__name__}")
    for k in saved:
        setattr(teacher, k, how[k])
    try:
        yield {k: how[k] for k in ("solver", "steps", "schedule")}
    finally:
        for k, v in saved.items():
            setattr(teacher, k, v)


@torch.no_grad()
def endpoint_error(teacher: Teacher, z: torch.Tensor, reference_x: torch.Tensor, how: dict, float64: bool) -> float:
    with grid_of(teacher, how) as h:
        x = sample_teacher(teacher, z.double() if float64 else z, h["steps"], h["solver"],
                           schedule=h["schedule"]).x.double()
    return float((x - reference_x).flatten(1).norm(dim=1).div(reference_x.flatten(1).norm(dim=1)).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run folder with teacher/")
    p.add_argument("-c", "--config", type=Path, default=None, help="preset the run used (default: embedded digits)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (e.g. eval.features=pixel)")
    p.add_argument("--samplers", required=True, help="comma-separated SOLVER:STEPS:SCHEDULE list")
    p.add_argument("-n", type=int, default=1000, help="samples per Frechet distance (default 1000; 0: none)")
    p.add_argument("--err-n", type=int, default=64, help="samples for the error against the reference (default 64)")
    p.add_argument("--ref", default="dpm++2m:256:trimmed",
                   help="SOLVER:STEPS:SCHEDULE of the reference solution (default dpm++2m:256:trimmed)")
    p.add_argument("--teacher", type=Path, default=None, help="teacher file or folder (default RUN/teacher)")
    p.add_argument("--ema", choices=["ema", "raw"], default="ema", help="teacher weights: EMA (default) or raw")
    p.add_argument("--float64", action="store_true", help="error column: keep the solver state in float64")
    p.add_argument("--sigma-min", type=float, default=None, help="EDM teachers: sigma_min of the schedule")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    p.add_argument("--ref-cache", type=Path, default=None,
                   help="reference statistics cache (default RUN/reference-FEATURES-SPLIT.npz, as lmm demo uses)")
    args = p.parse_args()
    cfg = load_config(args.config, [f"run.dir={args.run}", "run.progress=false", *args.overrides])
    e = cfg["eval"]
    (ref_how,) = parse_samplers(args.ref)
    teacher, _ = load_model(args.teacher or args.run / "teacher")
    if args.ema == "raw":
        ckpt = latest_checkpoint(args.run / "teacher")
        if ckpt is None:
            raise SystemExit(f"--ema raw: no checkpoint under {args.run / 'teacher'}")
        teacher.model.load_state_dict(load_checkpoint(ckpt)[0]["model"])
    if args.sigma_min is not None:
        teacher.sigma_min = args.sigma_min
    shape = tuple(teacher.model.data_shape)
    z, _ = next(noise_batches(args.err_n, args.err_n, shape, 0, e["seed"] + 1))
    x_ref = sample_teacher(teacher, z.double(), ref_how["steps"], ref_how["solver"], schedule=ref_how["schedule"]).x
    x_ref = x_ref.double()
    ref = reference(cfg, torch.device("cpu"), args.ref_cache or reference_cache(cfg)) if args.n else None
    rows = []
    for how in parse_samplers(args.samplers):
        nfe = expected_nfe(how["solver"], how["steps"], teacher.singular_end)
        row = {**how, "nfe": nfe, "err": endpoint_error(teacher, z, x_ref, how, args.float64)}
        if ref is not None:
            start = time.perf_counter()
            with grid_of(teacher, how) as h:
                out = sample(teacher, args.n, seed=e["seed"], batch_size=e["batch_size"], **h)
            row.update(score(ref, out["images"]), seconds=round(time.perf_counter() - start, 1))
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    ref_nfe = expected_nfe(ref_how["solver"], ref_how["steps"], teacher.singular_end)
    print(f"\nteacher weights: {args.ema}; state {'float64' if args.float64 else 'float32'}; {args.n} samples; "
          f"sigma_min {getattr(teacher, 'sigma_min', None)}; err against {ref_how['solver']} {ref_how['steps']} steps "
          f"({ref_how['schedule']}, {ref_nfe} NFE, float64) on {args.err_n} samples\n")
    key = ref.key if ref is not None else None
    cols = f" {key} | precision | recall |" if key else ""
    print(f"| solver | steps | schedule | NFE | rel. error |{cols}\n|---|---|---|---|---|{'---|---|---|' if key else ''}")
    for r in rows:
        tail = f" {r[key]:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |" if key else ""
        grid = f" (rho {r['rho']:g}, sigma_min {r['sigma_min']:g})" if "rho" in r else ""
        print(f"| {r['solver']} | {r['steps']} | {r['schedule']}{grid} | {r['nfe']} | {r['err']:.4f} |{tail}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

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

    python benchmarks/teacher_solvers.py --run runs/fashion_mnist -c configs/fashion_mnist.toml -n 1000 \\
        --samplers euler:16:edm,heun:12:edm,heun:12:trimmed,dpm++2m:23:trimmed [KEY=VALUE ...] [--out F.json]
    python benchmarks/teacher_solvers.py --run runs/fashion_mnist -c configs/fashion_mnist.toml -n 0 --err-n 256 \
        --ref heun:18:edm --samplers dpm++2m:12:edm,dpm++2m:17:trimmed [--teacher FILE]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lmm.checkpoint import latest_checkpoint, load_checkpoint
from lmm.config import load_config
from lmm.evaluate import reference, reference_cache, score
from lmm.models import load_model
from lmm.pipeline import noise_batches, sample
from lmm.solvers import expected_nfe
from lmm.teachers import Teacher, sample_teacher


def parse_samplers(text: str) -> list[dict]:
    """"euler:16:edm,dpm++2m:8:trimmed" -> [{"solver": "euler", "steps": 16, "schedule": "edm"}, ...]."""
    out = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) != 3:
            raise SystemExit(f"--samplers: {item!r} is not SOLVER:STEPS:SCHEDULE")
        out.append({"solver": parts[0], "steps": int(parts[1]), "schedule": parts[2]})
    return out


@torch.no_grad()
def endpoint_error(teacher: Teacher, z: torch.Tensor, reference_x: torch.Tensor, how: dict, float64: bool) -> float:
    x = sample_teacher(teacher, z.double() if float64 else z, how["steps"], how["solver"],
                       schedule=how["schedule"]).x.double()
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
            out = sample(teacher, args.n, seed=e["seed"], batch_size=e["batch_size"], **how)
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
        print(f"| {r['solver']} | {r['steps']} | {r['schedule']} | {r['nfe']} | {r['err']:.4f} |{tail}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

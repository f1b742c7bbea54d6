"""Speed ratios of the pipeline against bare loops of the same network, measured side by side in one run.

1. pair generation (lmm.pairs.make_pairs with the teacher's solver) against the teacher network's bare
   batched forward throughput divided by the solver's NFE (the store is timed whole: noise, solver, shard
   writes with fsync and checksums; after a warm-up store);
2. student training (lmm.train.train on a pair store: data, objective, clipping, EMA, logging) against a
   bare forward-backward-AdamW loop of the same network on tensors already in memory, interleaved: `repeats`
   rounds of bare windows then a train() call that resumes for the next share of --steps. "steady" compares
   the median of the loop's own samples/s between its log records (the first of each call skipped) with the
   median bare window; "whole call" times each train() call with its start-up, resume and final checkpoint;
3. student sampling at NFE 1 against teacher sampling with its solver (same batch, same network size).

Networks are freshly initialised (speed does not depend on the weights). The data shape is the digits'
(1, 8, 8) for data.name=digits and Fashion-MNIST's (1, 28, 28) otherwise; no dataset is read.
Usage:

    python benchmarks/bench_pipeline_speed.py [-c CONFIG] [KEY=VALUE ...] [--pairs N] [--steps N] [--repeats N]

e.g. a quick smoke run: `--pairs 64 --steps 4 --repeats 1 student.train.batch_size=16 pairs.batch_size=32`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from lmm.config import load_config
from lmm.models import build_model, student_objective, teacher_objective
from lmm.pairs import PairSource, make_pairs
from lmm.pipeline import teacher_sampler
from lmm.sampling import sample_lines
from lmm.solvers import expected_nfe
from lmm.teachers import build_teacher
from lmm.teachers.base import sample_teacher
from lmm.train import TrainSettings, train


def rates(fns: dict[str, tuple], repeats: int) -> dict[str, float]:
    """Items per second of each fn in {name: (fn, n_items)}: one warm-up call each, then `repeats` rounds
    that call every fn in turn (so machine noise hits all alike); best round per fn."""
    best = {name: float("inf") for name in fns}
    for name, (fn, _) in fns.items():
        fn()
    for _ in range(repeats):
        for name, (fn, _) in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: n / best[name] for name, (_, n) in fns.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=None, help="preset (default: embedded digits)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides (teacher/student networks, solver, pairs.batch_size, "
                             "student.train.batch_size, ...)")
    parser.add_argument("--pairs", type=int, default=4096, help="pairs to generate per timed store (default 4096)")
    parser.add_argument("--steps", type=int, default=100, help="training steps timed (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per measurement (default 3)")
    args = parser.parse_intermixed_args()
    for name in ("pairs", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    cfg = load_config(args.config, args.overrides)
    t, s = cfg["teacher"], cfg["student"]
    shape = (1, 8, 8) if cfg["data"]["name"] == "digits" else (1, 28, 28)
    torch.manual_seed(0)
    teacher_model = build_model(teacher_objective(t), t["net"], shape, 0).eval()
    teacher = build_teacher(t["kind"], teacher_model, sigma_min=t["sigma_min"], sigma_max=t["sigma_max"], rho=t["rho"])
    nfe = expected_nfe(t["solver"], t["steps"], teacher.singular_end)
    b = cfg["pairs"]["batch_size"]
    rows = []

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "pairs"
        gen = teacher_sampler(teacher, t["solver"], t["steps"], bf16=False, schedule=t["schedule"])
        kw = dict(data_shape=shape, num_classes=0, meta={"bench": True}, batch_size=b, progress=False)
        x, sigma = torch.randn(b, *shape), torch.full((b,), 1.0)
        stores = iter(range(args.repeats + 2))

        def forward_nfe() -> None:
            with torch.no_grad():
                for _ in range(nfe):
                    teacher_model(x, sigma)

        def pairs() -> None:
            k = next(stores)
            make_pairs(Path(tmp) / f"pairs{k}", gen, n_pairs=args.pairs, seed=k,
                       shard_size=min(args.pairs, cfg["pairs"]["shard_size"]), **kw)

        r = rates({"forward": (forward_nfe, b), "pairs": (pairs, args.pairs)}, args.repeats)
        store = Path(tmp) / "pairs1"
        rows.append(("pair generation (pairs/s)", r["pairs"], r["forward"],
                     f"bare batched forward {r['forward'] * nfe:.0f}/s / NFE {nfe}"))

        objective = student_objective(s, t)
        bs = s["train"]["batch_size"]
        student = build_model(objective, s["net"], shape, 0)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        xt, tt, target = torch.randn(bs, *shape), torch.rand(bs), torch.randn(bs, *shape)

        def bare_step() -> None:
            loss = (student(xt, tt) - target).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        source = PairSource(store, seed=0)
        window = max(1, min(10, args.steps // 2))
        settings = TrainSettings(steps=5, batch_size=bs, lr=1e-4, ema_halflife=s["train"]["ema_halflife"],
                                 warmup_steps=0, grad_clip=s["train"]["grad_clip"], bf16=False, seed=0,
                                 ckpt_every=5, log_every=window, device="cpu", progress=False)
        train(student, objective, source, settings, run_dir=Path(tmp) / "warm", meta={"bench": True})
        log_path = Path(tmp) / "student" / "log.jsonl"
        bare_rates, loop_rates, whole = [], [], []
        for r in range(args.repeats):
            for _ in range(max(1, args.steps // (window * args.repeats))):
                start = time.perf_counter()
                for _ in range(window):
                    bare_step()
                bare_rates.append(window * bs / (time.perf_counter() - start))
            done = len(log_path.read_text().splitlines()) if log_path.is_file() else 0
            steps = (r + 1) * args.steps // args.repeats
            start = time.perf_counter()
            train(student, objective, source, replace(settings, steps=steps, ckpt_every=steps, extend=True),
                  run_dir=Path(tmp) / "student", meta={"bench": True})
            whole.append((steps - r * args.steps // args.repeats) * bs / (time.perf_counter() - start))
            log = [json.loads(line) for line in log_path.read_text().splitlines()][done:]
            loop_rates += [rec["samples_per_s"] for rec in (log[1:] or log)]
        median = lambda v: sorted(v)[len(v) // 2]
        rows.append(("student training, steady, median window (samples/s)", median(loop_rates), median(bare_rates),
                     f"bare forward-backward-AdamW loop, median of {window}-step windows, interleaved"))
        rows.append(("student training, best window (samples/s)", max(loop_rates), max(bare_rates),
                     "bare loop, best window"))
        rows.append(("student training, whole call (samples/s)", median(whole), median(bare_rates),
                     "bare loop; lmm counts start-up, resume and the final checkpoint"))

    student.eval()
    z = torch.randn(b, *shape)
    r = rates({"student": (lambda: sample_lines(student, z, [0.0]), b),
               "teacher": (lambda: sample_teacher(teacher, z, t["steps"], t["solver"], schedule=t["schedule"]), b)},
              args.repeats)
    student_rate, teacher_rate = r["student"], r["teacher"]
    rows.append(("student NFE 1 sampling (samples/s)", student_rate, teacher_rate * nfe,
                 f"teacher {t['solver']} NFE {nfe}: {teacher_rate:.0f}/s, x NFE"))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, teacher net {t['net']}, batch {b}\n")
    print("| measurement | lmm | reference | ratio | reference is |\n|---|---|---|---|---|")
    for name, ours, ref, what in rows:
        print(f"| {name} | {ours:.0f} | {ref:.0f} | {ours / ref:.2f} | {what} |")


if __name__ == "__main__":
    main()

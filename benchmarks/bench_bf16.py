"""bf16 autocast against fp32, side by side in one run: training speed, sampling speed and sample quality.

Training: samples/s of lmm.train.train on the config's student network (freshly initialised), fp32 vs bf16 autocast.
Sampling and quality: a trained run's teacher (its own solver) and student (NFE 1), each sampled in fp32
and bf16 from the same noise; Frechet distance (eval.features) against the dataset.
Usage, after `lmm demo` made runs/demo:

    python benchmarks/bench_bf16.py --run runs/demo [-c CONFIG] [KEY=VALUE ...] [--steps 40] [-n N]

CONFIG and the KEY=VALUE overrides should be those the run was made with (the dataset, eval settings and
the student network timed in training come from them).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from lmm.config import load_config
from lmm.data.arrays import TensorSource
from lmm.data.from_config import load_data
from lmm.evaluate import reference, score
from lmm.generate import sample
from lmm.models import build_model, load_model, student_objective
from lmm.train import TrainSettings, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run folder with teacher/ and student/")
    parser.add_argument("-c", "--config", type=Path, default=None, help="preset the run used (default: embedded)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (as given to the run)")
    parser.add_argument("--steps", type=int, default=40, help="training steps timed per precision (default 40)")
    parser.add_argument("-n", type=int, default=None, help="samples per quality measurement (default eval.n)")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.config, [*args.overrides, f"run.dir={args.run}", "run.progress=false"])
    s, e = cfg["student"], cfg["eval"]
    n = args.n or e["n"]
    data = load_data(cfg)
    shape = tuple(data.x.shape[1:])
    bs = s["train"]["batch_size"]
    pairs = TensorSource({"z": torch.randn_like(data.x), "x1": data.x}, seed=0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}\n")
    print("| measurement | fp32 | bf16 | bf16 / fp32 |\n|---|---|---|---|")
    rates = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        objective = student_objective(s, cfg["teacher"])
        model = build_model(objective, s["net"], shape, 0)
        with tempfile.TemporaryDirectory() as tmp:
            settings = TrainSettings(steps=3, batch_size=bs, lr=1e-3, ema_halflife=1e4, warmup_steps=0, grad_clip=1.0,
                                     bf16=bf16, seed=0, ckpt_every=3, log_every=1000, device="cpu", progress=False)
            train(model, objective, pairs, settings, run_dir=Path(tmp) / "w", meta={})
            start = time.perf_counter()
            train(model, objective, pairs, replace(settings, steps=args.steps, ckpt_every=args.steps),
                  run_dir=Path(tmp) / "t", meta={})
            rates[bf16] = args.steps * bs / (time.perf_counter() - start)
    print(f"| student training (samples/s) | {rates[False]:.0f} | {rates[True]:.0f} | {rates[True] / rates[False]:.2f} |")

    ref = reference(cfg, torch.device("cpu"))
    teacher, tmeta = load_model(args.run / "teacher")
    student, _ = load_model(args.run / "student")
    tm = tmeta["teacher"]  # the sampler the run's teacher was trained with (model files before "schedule": edm)
    for name, model, how in (("teacher " + tm["solver"], teacher,
                              {"solver": tm["solver"], "steps": tm["steps"], "schedule": tm.get("schedule", "edm")}),
                             ("student NFE 1", student, {"grid": [0.0]})):
        out = {}
        for bf16 in (False, True):
            start = time.perf_counter()
            res = sample(model, n, seed=e["seed"], batch_size=e["batch_size"], bf16=bf16, **how)
            seconds = time.perf_counter() - start
            out[bf16] = (n / seconds, score(ref, res["images"])[ref.key])
        print(f"| {name} sampling (samples/s) | {out[False][0]:.0f} | {out[True][0]:.0f} | "
              f"{out[True][0] / out[False][0]:.2f} |")
        print(f"| {name} quality ({e['features']} FD, {n} samples) | {out[False][1]:.4f} | {out[True][1]:.4f} | "
              f"{out[True][1] / out[False][1]:.2f} |")


if __name__ == "__main__":
    main()

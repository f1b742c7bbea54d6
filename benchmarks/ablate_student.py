"""Ablation of the student's open choices on one teacher and one pair store (method.md's [choice]s).

Trains one student per variant (KEY=VALUE overrides of the student section) on RUN/pairs, samples each
at NFE 1 and 2 from the same seeded noise, and prints a Markdown table of Frechet distances
(eval.features) against the dataset. Sampler-only variants (line vs restart, the NFE-2 grid) reuse the
default student. Usage, after `lmm demo` has made runs/demo:

    python benchmarks/ablate_student.py --run runs/demo [-c CONFIG] [--only NAME,...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lmm.config import load_config
from lmm.evaluate import reference
from lmm.models import load_model
from lmm.pipeline import sample, train_student

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "t uniform": ["student.time_sampling=uniform"],
    "t logit-normal": ["student.time_sampling=logit_normal"],
    "pseudo-Huber": ["student.distance=pseudo_huber"],
    "no precond": ["student.precond=false"],
    "init scratch": ["student.init=scratch"],
    "balanced w(t), t uniform": ["student.weighting=balanced", "student.time_sampling=uniform"],
}
SAMPLERS: dict[str, dict] = {
    "restart mode, grid [0, 0.5]": {"mode": "restart", "grid": [0.0, 0.5]},
    "line, grid [0, 0.3]": {"grid": [0.0, 0.3]},
    "line, grid [0, 0.7]": {"grid": [0.0, 0.7]},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run folder holding teacher/ and pairs/")
    parser.add_argument("-c", "--config", type=Path, default=None, help="preset the run used (default: embedded)")
    parser.add_argument("--only", default=None, help="comma-separated variant names to run (default: all)")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    base = load_config(args.config, [f"run.dir={args.run}", "run.progress=false"])
    e = base["eval"]
    ref = reference(base, torch.device("cpu"))

    def score(model: torch.nn.Module, **how) -> tuple[float, int]:
        out = sample(model, e["n"], seed=e["seed"], batch_size=e["batch_size"], **how)
        return score(ref, out["images"])[ref.key], out["nfe"]

    rows = []
    for name, overrides in VARIANTS.items():
        if only and name not in only:
            continue
        folder = args.run / "ablations" / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        cfg = load_config(args.config, [f"run.dir={folder}", "run.progress=false", *overrides])
        path = train_student(cfg, store=args.run / "pairs", teacher_path=args.run / "teacher" / "model.safetensors")
        model, _ = load_model(path)
        grid = cfg["student"]["grid"]
        fd1, _ = score(model, grid=[0.0])
        fd2, _ = score(model, grid=grid)
        rows.append({"variant": name, "overrides": " ".join(overrides) or "-", "nfe1": fd1, "nfe2": fd2})
        print(json.dumps(rows[-1]), flush=True)
        if name == "default":
            for sname, how in SAMPLERS.items():
                if only and sname not in only:
                    continue
                fd, _ = score(model, **how)
                rows.append({"variant": sname, "overrides": "(sampler only)", "nfe1": None, "nfe2": fd})
                print(json.dumps(rows[-1]), flush=True)

    key = ref.key
    print(f"\n| variant | overrides | {key} NFE 1 | {key} NFE 2 |\n|---|---|---|---|")
    for r in rows:
        nfe1 = "" if r["nfe1"] is None else f"{r['nfe1']:.3f}"
        print(f"| {r['variant']} | `{r['overrides']}` | {nfe1} | {r['nfe2']:.3f} |")


if __name__ == "__main__":
    main()

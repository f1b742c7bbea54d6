"""Ablation of the student's open choices on one teacher and one pair store (docs/method.md's [choice]s).

Trains one student per variant (KEY=VALUE overrides of the student section) on RUN/pairs, samples each
at NFE 1 and 2 from the same seeded noise, and prints a Markdown table of Frechet distances
(eval.features) against the dataset. Sampler-only variants (line vs restart, the NFE-2 grid) reuse the
default student (which is trained whenever one of them is selected). Each variant's student is written
to RUN/ablations/<variant>/. Usage, after `lmm demo` has made runs/demo:

    python benchmarks/ablate_student.py --run runs/demo [-c CONFIG] [KEY=VALUE ...] [--only NAME ...]
        [--out rows.json]

KEY=VALUE overrides apply to every variant, before the variant's own (e.g. `student.train.steps=200
eval.n=500` for a quicker pass); they must leave the run's teacher and data as the run made them.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from lmm.config import load_config
from lmm.evaluate import reference, score
from lmm.generate import sample
from lmm.models import load_model
from lmm.pipeline import train_student

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "t uniform": ["student.time_sampling=uniform"],
    "t logit-normal": ["student.time_sampling=logit_normal"],
    "pseudo-Huber": ["student.loss={pseudo_huber=1.0}"],
    "no precond": ["student.precond=none"],
    "precond lines (previous default)": ["student.precond=lines"],
    "init scratch": ["student.init=scratch"],
    "balanced w(t), t uniform": ["student.weighting=balanced", "student.time_sampling=uniform"],
}
# sampler-only variants of the default student; names hold no comma, so --only can list them comma-separated
SAMPLERS: dict[str, dict] = {
    "sampler: restart mode grid [0 0.5]": {"mode": "restart", "grid": [0.0, 0.5]},
    "sampler: line grid [0 0.3]": {"grid": [0.0, 0.3]},
    "sampler: line grid [0 0.7]": {"grid": [0.0, 0.7]},
}


def _select(values: list[str] | None) -> set[str] | None:
    """Names picked by --only: each value is a whole variant name or a comma-separated list of them."""
    if not values:
        return None
    known = [*VARIANTS, *SAMPLERS]
    picked: set[str] = set()
    for value in values:
        names = [value] if value in known else [v.strip() for v in value.split(",") if v.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"--only: unknown variant(s) {unknown}; known: {known}")
        picked.update(names)
    return picked


def _folder(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run folder holding teacher/ and pairs/")
    parser.add_argument("-c", "--config", type=Path, default=None, help="preset the run used (default: embedded)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides applied to every variant (before the variant's own)")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="variant to run (repeatable, or comma-separated names; default: all). Known: "
                             + "; ".join([*VARIANTS, *SAMPLERS]))
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON to this file")
    args = parser.parse_intermixed_args(argv)
    only = _select(args.only)
    common = [*args.overrides, "run.progress=false"]
    base = load_config(args.config, [*common, f"run.dir={args.run}"])
    e = base["eval"]
    ref = reference(base, torch.device("cpu"))

    def fd(model: torch.nn.Module, **how) -> float:
        out = sample(model, e["n"], seed=e["seed"], batch_size=e["batch_size"], **how)
        return score(ref, out["images"])[ref.key]

    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name, overrides in VARIANTS.items():
        samplers = [s for s in SAMPLERS if name == "default" and (only is None or s in only)]
        if only is not None and name not in only and not samplers:
            continue
        cfg = load_config(args.config, [*common, f"run.dir={args.run / 'ablations' / _folder(name)}", *overrides])
        path = train_student(cfg, store=args.run / "pairs", teacher_path=args.run / "teacher" / "model.safetensors")
        model, _ = load_model(path)
        emit({"variant": name, "overrides": " ".join(overrides) or "-", "nfe1": fd(model, grid=[0.0]),
              "nfe2": fd(model, grid=cfg["student"]["grid"])})
        for sname in samplers:
            emit({"variant": sname, "overrides": "(sampler only)", "nfe1": None, "nfe2": fd(model, **SAMPLERS[sname])})

    key = ref.key
    print(f"\n| variant | overrides | {key} NFE 1 | {key} NFE 2 |\n|---|---|---|---|")
    for r in rows:
        nfe1 = "" if r["nfe1"] is None else f"{r['nfe1']:.3f}"
        print(f"| {r['variant']} | `{r['overrides']}` | {nfe1} | {r['nfe2']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"distance_key": key, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""LMM against its rivals in one harness: the same teacher, network, budget and metric, side by side.

Rows (--methods, in this order by default):
- teacher: the teacher's own sampler (the one that made the pairs) and its best few-step rows at each --nfe
  (eval.teacher_solvers on the trimmed grid);
- lmm_l2: the LMM student with the plain L2 loss (student.loss = {l2 = 1.0});
- lmm_full: the LMM student with the config's student.loss (the Fashion-MNIST preset: L2 + perceptual + adversarial);
- reflow: 2-rectified flow on the same pair store (velocity target x1 - z, t uniform, Euler sampling);
- ot_cfm: flow matching with mini-batch exact OT coupling, trained on the dataset from scratch;
- consistency: consistency distillation from the same teacher (EMA target, one Heun step of the teacher between
  adjacent times, the lmm_full loss without its adversarial term), multistep consistency sampling.
Every student has the config's student.net and is evaluated at each --nfe with eval.* (FID: eval.features against
eval.split), precision / recall and the straightness of its own ODE.

Budget, in network passes of the shared architecture (forward 1, forward + backward 3, so the count does not depend
on the machine): the LMM rows cost the teacher's training (teacher.train.steps x batch x 3), the pairs
(pairs.n x the pair sampler's NFE) and the student's training (student.train.steps x batch x 3). 2-RF gets the
same steps on the same pairs. OT-CFM, which needs no teacher, gets all of it as its own training steps; consistency
distillation gets the pairs' and the student's share as its steps at 6 passes per sample (student 3, EMA target 1,
teacher Heun step 2). The frozen EfficientNet of the fidelity terms is not counted; each row's measured training
wall time is in the table.

Each row trains in OUT/<method> (teacher/ and pairs/ link to RUN's) and keeps its metrics in
OUT/<method>/quality.json, so an interrupted run resumes row by row (training resumes from its checkpoints).
OUT/quality.html shows the table and every method's samples side by side (the same seeded noise for all, at the
best sampler of each NFE); OUT/quality.json holds every row.

    python benchmarks/quality.py -c configs/fashion_mnist_small.toml --run runs/fashion_mnist_small --out runs/quality \\
        [--methods teacher,lmm_l2,...] [--nfe 1,2] [--bench BENCHMARKS.md] [KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import html
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmm.config import load_config
from lmm.data.images import save_image_grid
from lmm.evaluate import evaluate_inputs, reference_cache
from lmm.generate import sample
from lmm.io import atomic_write_text, save_json
from lmm.models import load_model
from lmm.pairs import open_pairs
from lmm.pipeline import generate_pairs, train_student, train_teacher
from lmm.solvers import steps_within
from lmm.teachers import Teacher

METHODS = ("teacher", "lmm_l2", "lmm_full", "reflow", "ot_cfm", "consistency")
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
CD_PASSES = 6


def budget(cfg: dict, pair_nfe: int) -> dict[str, int]:
    """Network passes of the teacher's training, the pairs and the LMM student's training (see module docstring)."""
    t, s = cfg["teacher"]["train"], cfg["student"]["train"]
    return {"teacher": 3 * t["steps"] * t["batch_size"], "pairs": cfg["pairs"]["n"] * pair_nfe,
            "student": 3 * s["steps"] * s["batch_size"]}


def method_overrides(method: str, cfg: dict, passes: dict[str, int]) -> list[str]:
    """KEY=VALUE overrides that turn the base config into `method`'s student with its share of the budget."""
    batch = cfg["student"]["train"]["batch_size"]
    loss = cfg["student"]["loss"]
    if method == "lmm_l2":
        return ["student.objective=lines", "student.loss={l2=1.0}"]
    if method == "lmm_full":
        return ["student.objective=lines"]
    if method == "reflow":
        return ["student.objective=reflow", "student.loss={l2=1.0}"]
    if method == "ot_cfm":
        steps = -(-sum(passes.values()) // (3 * batch))
        return ["student.objective=ot_cfm", "student.init=scratch", "student.loss={l2=1.0}", f"student.train.steps={steps}"]
    if method == "consistency":
        steps = -(-(passes["pairs"] + passes["student"]) // (CD_PASSES * batch))
        cd_loss = {k: w for k, w in loss.items() if k != "adversarial"} or {"l2": 1.0}
        table = "{" + ",".join(f"{k}={w}" for k, w in cd_loss.items()) + "}"
        return ["student.objective=consistency", f"student.loss={table}", f"student.train.steps={steps}"]
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def _link(folder: Path, run: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("teacher", "pairs"):
        link = folder / part
        if not link.exists():
            link.symlink_to((run / part).resolve())


def run_row(method: str, args: argparse.Namespace, base: list[str], passes: dict[str, int]) -> dict[str, Any]:
    """Train (unless teacher) and evaluate one method; the row is cached in OUT/<method>/quality.json."""
    folder = args.out / method
    cached = folder / "quality.json"
    cfg0 = load_config(args.config, base)
    extra = [] if method == "teacher" else method_overrides(method, cfg0, passes)
    cfg = load_config(args.config, [*base, f"run.dir={folder}", *extra])
    key = {"method": method, "overrides": extra, "nfe": args.nfe, "eval": cfg["eval"], "student": cfg["student"]}
    if cached.is_file():
        row = json.loads(cached.read_text())
        if row.get("key") == key:
            return row
    _link(folder, args.run)
    wall = 0.0
    cache = args.ref_cache or reference_cache(cfg0)
    if method == "teacher":
        model = folder / "teacher"
        manifest = open_pairs(folder / "pairs").manifest
        own = load_config(args.config, [*base, f"run.dir={folder}", f"eval.teacher_solvers=[\"{manifest['solver']}\"]"])
        metrics = evaluate_inputs(cfg, model=model, nfes=args.nfe, cache=cache)
        metrics["results"] += evaluate_inputs(own, model=model, nfes=[manifest["nfe"]], cache=cache)["results"]
    else:
        start = time.perf_counter()
        model = train_student(cfg).parent
        wall = time.perf_counter() - start
        metrics = evaluate_inputs(cfg, model=model, nfes=args.nfe, cache=cache)
    row = {"key": key, "method": method, "overrides": extra, "train_wall_s": round(wall, 1),
           "distance_key": metrics["distance_key"], "results": metrics["results"]}
    save_json(cached, row)
    return row


def _fmt(r: dict[str, Any] | None, key: str) -> str:
    if r is None:
        return ""
    pr = f" ({r['precision']:.3f} / {r['recall']:.3f})" if r.get("precision") is not None else ""
    return f"{r[key]:.2f}{pr}"


def table(rows: list[dict[str, Any]], nfes: list[int], passes: dict[str, int], cfg: dict) -> str:
    """Markdown: one line per method, FID (precision / recall) at each NFE, straightness, budget, wall time."""
    batch = cfg["student"]["train"]["batch_size"]
    head = (["method", *[f"NFE {k}: FID (P / R)" for k in nfes], "straightness", "budget (passes)",
             "training steps", "train wall min"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    total = sum(passes.values())
    for row in rows:
        key = row["distance_key"]
        results = row["results"]
        best = {k: _best(results, key, k) for k in nfes}
        steps = next((o.split("=")[1] for o in row["overrides"] if o.startswith("student.train.steps=")),
                     str(cfg["student"]["train"]["steps"]))
        if row["method"] == "teacher":
            own = max(results, key=lambda r: r["nfe"])
            label = f"teacher ({own['solver']} {own['nfe']} NFE: {_fmt(own, key)}); best few-step rows"
            spent, steps = f"{passes['teacher']:,} + pairs", str(cfg["teacher"]["train"]["steps"])
        else:
            label = row["method"]
            own_steps = int(steps)
            spent = (f"{passes['teacher'] + CD_PASSES * own_steps * batch:,}" if row["method"] == "consistency"
                     else f"{3 * own_steps * batch:,}" if row["method"] == "ot_cfm" else f"{total:,}")
        straight = results[0].get("straightness")
        lines.append("| " + " | ".join([label, *[_fmt(best[k], key) for k in nfes],
                                         "" if straight is None else f"{straight:.3f}", spent, steps,
                                         f"{row['train_wall_s'] / 60:.1f}"]) + " |")
    return "\n".join(lines)


def _best(results: list[dict[str, Any]], key: str, nfe: int) -> dict[str, Any] | None:
    return min((r for r in results if r["nfe"] == nfe), key=lambda r: r[key], default=None)


def write_page(rows: list[dict[str, Any]], out: Path, text: str, nfes: list[int], n: int, seed: int) -> Path:
    """OUT/quality.html: the table, then one line of sample grids per method (n samples from the same seeded noise
    at the best sampler of each NFE; the teacher also at its own sampler). OUT/quality_samples.png: one row per
    method (in table order), its first 8 samples at each of `nfes` side by side."""
    parts = ["<h1>LMM against its rivals</h1>", f"<pre>{html.escape(text)}</pre>", "<table>"]
    strips = []
    for row in rows:
        folder = out / row["method"]
        model, _ = load_model(folder / ("teacher" if row["method"] == "teacher" else "student"))
        picks = [r for r in (_best(row["results"], row["distance_key"], k) for k in nfes) if r is not None]
        if row["method"] == "teacher":
            picks.append(max(row["results"], key=lambda r: r["nfe"]))
        cells, strip = [], []
        for r in picks:
            if isinstance(model, Teacher):
                how = {"solver": r["solver"], "steps": steps_within(r["solver"], r["nfe"], model.singular_end),
                       "schedule": "trimmed"}
            else:
                how = {"grid": r["time_grid"]}
            images = sample(model, n, seed=seed, batch_size=n, **how)["images"]
            name = f"{row['method']}/samples_nfe{r['nfe']}_{r['solver']}.png"
            save_image_grid(images, out / name)
            if len(strip) < len(nfes):
                strip.append(np.asarray(images[:8]))
            cells.append(f"<td><img src='{html.escape(name)}' style='width:220px;image-rendering:pixelated'><br>"
                         f"{html.escape(r['label'])}: {r[row['distance_key']]:.2f}</td>")
        parts.append(f"<tr><th>{html.escape(row['method'])}</th>{''.join(cells)}</tr>")
        if len(strip) == len(nfes) and all(len(a) == 8 for a in strip):
            strips.extend(strip)
    parts.append("</table>")
    if strips:
        save_image_grid(np.concatenate(strips), out / "quality_samples.png", nrow=8 * len(nfes))
    page = out / "quality.html"
    atomic_write_text(page, "<!doctype html><meta charset='utf-8'><title>lmm quality</title>"
                      "<style>body{font-family:system-ui,sans-serif}td,th{padding:6px;vertical-align:top;"
                      "font-size:13px}</style>" + "".join(parts))
    return page


def write_bench(path: Path, text: str) -> None:
    """Replace the text between the quality markers of `path` (appended with them when absent)."""
    old = path.read_text() if path.is_file() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", type=Path, default=None, help="preset (default: the embedded digits preset)")
    p.add_argument("--run", type=Path, required=True,
                   help="run folder whose teacher/ and pairs/ every row shares (trained / generated when missing)")
    p.add_argument("--out", type=Path, required=True, help="folder for one sub-folder per method")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--nfe", default="1,2", help="student NFEs to evaluate (default 1,2)")
    p.add_argument("--ref-cache", type=Path, default=None,
                   help="reference statistics cache (default: RUN/reference-FEATURES-SPLIT.npz, as lmm eval)")
    p.add_argument("--bench", type=Path, default=None,
                   help="markdown file whose quality section (between the quality markers) gets the table")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every row")
    args = p.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; valid: {', '.join(METHODS)}")
    try:
        args.nfe = [int(k) for k in args.nfe.split(",")]
    except ValueError:
        p.error(f"--nfe: expected comma-separated integers, got {args.nfe!r}")
    base = [o for o in args.overrides if not o.startswith("run.dir=")] + [f"run.dir={args.run}"]
    cfg = load_config(args.config, base)
    if not (args.run / "teacher" / "model.safetensors").is_file():
        train_teacher(cfg)
    generate_pairs(cfg)
    passes = budget(cfg, open_pairs(args.run / "pairs").manifest["nfe"])
    rows = []
    for method in methods:
        print(f"[quality] {method}", flush=True)
        rows.append(run_row(method, args, base, passes))
    text = (f"Budget of the LMM rows: {sum(passes.values()):,} network passes (teacher training {passes['teacher']:,}, "
            f"pairs {passes['pairs']:,}, student training {passes['student']:,}).\n\n" + table(rows, args.nfe, passes, cfg))
    print(text)
    save_json(args.out / "quality.json", rows)
    write_page(rows, args.out, text, args.nfe, 32, cfg["eval"]["seed"])
    if args.bench is not None:
        write_bench(args.bench, text)


if __name__ == "__main__":
    main()

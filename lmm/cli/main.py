"""The `lmm` command: one subcommand per pipeline stage. Run `lmm SUBCOMMAND --help` for each one's options."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmm import dist
from lmm.config import ConfigError, flat_keys, load_config
from lmm.io import save_json
from lmm.solvers import METHODS
from lmm.teachers.base import SCHEDULES

CONFIG_HELP = """Config: a TOML preset (-c, e.g. configs/fashion_mnist.toml; default: the embedded digits
preset) and any number of KEY=VALUE overrides (e.g. teacher.train.steps=500 run.dir=runs/x
student.grid=[0.0,0.6]). `lmm config` prints every key with its value; an unknown key is an error."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, default=None, help="TOML preset (default: embedded digits preset)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. run.dir=runs/x")


def _config(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.overrides)
    return cfg


def _save_config(cfg: dict) -> None:
    if dist.is_main():
        save_json(Path(cfg["run"]["dir"]) / "config.json", cfg)


def _stage(cfg: dict, name: str):
    """Time a stage into RUN_DIR/timings.json (the report's time per stage), as `lmm demo` does."""
    from lmm.pipeline import Timer

    return Timer(Path(cfg["run"]["dir"]) / "timings.json").stage(name)


def cmd_config(args: argparse.Namespace) -> None:
    for key, value in flat_keys(_config(args)):
        print(f"{key} = {json.dumps(value)}")


def cmd_teacher_train(args: argparse.Namespace) -> None:
    from lmm import pipeline

    cfg = _config(args)
    _save_config(cfg)
    with _stage(cfg, "train teacher"):
        path = pipeline.train_teacher(cfg)
    print(path)


def cmd_pairs(args: argparse.Namespace) -> None:
    from lmm import pipeline

    cfg = _config(args)
    _save_config(cfg)
    with _stage(cfg, "generate pairs"):
        path = pipeline.generate_pairs(cfg, teacher_path=args.teacher, store=args.out)
    print(path)


def cmd_train(args: argparse.Namespace) -> None:
    from lmm import pipeline

    cfg = _config(args)
    _save_config(cfg)
    with _stage(cfg, "train student"):
        path = pipeline.train_student(cfg, store=args.pairs, teacher_path=args.teacher)
    print(path)


def cmd_sample(args: argparse.Namespace) -> None:
    from lmm import pipeline
    from lmm.models import load_model

    device = dist.init_distributed(args.device).device
    model, meta = load_model(args.model, device)
    grid = [float(g) for g in args.grid.split(",")] if args.grid else None
    schedule = "edm"
    if meta["role"] == "teacher":
        solver = args.solver or meta["teacher"]["solver"]
        steps = args.steps or (args.nfe if args.nfe else meta["teacher"]["steps"])
        schedule = args.schedule or meta["teacher"].get("schedule", "edm")
    elif args.solver or args.steps or args.schedule:
        raise SystemExit("--solver/--steps/--schedule apply to teachers; students take --nfe, --grid and --mode")
    else:
        solver, steps = "lines", None
    bf16 = dist.resolve_bf16(True if args.bf16 == "on" else False if args.bf16 == "off" else "auto", device)
    result = pipeline.sample(model, args.n, seed=args.seed, batch_size=args.batch_size, nfe=args.nfe, grid=grid,
                             mode=args.mode, solver=solver, steps=steps, schedule=schedule, bf16=bf16, device=device,
                             progress=dist.is_main())
    if dist.is_main():
        path = pipeline.save_samples(result, args.out)
        print(f"{path}: {args.n} samples, NFE {result['nfe']}")


def cmd_eval(args: argparse.Namespace) -> None:
    from lmm.evaluate import evaluate_inputs

    if not args.samples and args.model is None:
        raise ValueError("lmm eval needs --samples FILE.npz and/or --model PATH")
    nfes = [int(k) for k in args.nfe.split(",")]
    metrics = evaluate_inputs(_config(args), samples=args.samples, model=args.model, nfes=nfes, cache=args.ref_cache,
                              ref_file=args.ref)
    if dist.is_main():
        from lmm.io import atomic_write_text
        from lmm.report import nfe_plot

        save_json(args.out, metrics)
        key = metrics["distance_key"]
        for row in metrics["results"]:
            print(f"{row['label']}: " + "  ".join(f"{k} {row[k]:.4f}" for k in (
                key, "precision", "recall", "straightness", "endpoint_drift") if row.get(k) is not None))
        print(args.out)
        plot = nfe_plot(metrics["results"], key)
        if plot:
            atomic_write_text(args.out.with_suffix(".svg"), plot)
            print(args.out.with_suffix(".svg"))


def cmd_demo(args: argparse.Namespace) -> None:
    from lmm import demo

    cfg = _config(args)
    print(demo.run_demo(cfg))


def cmd_report(args: argparse.Namespace) -> None:
    from lmm.report import build_report

    print(build_report(args.run_dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmm", description="Lines Matching Models: teacher -> pairs -> straight-line student -> few-step samples.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("config", help="print the resolved config (every key)", epilog=CONFIG_HELP, formatter_class=fmt)
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    teacher = sub.add_parser("teacher", help="teacher commands").add_subparsers(dest="teacher_command", required=True,
                                                                                 metavar="COMMAND")
    p = teacher.add_parser("train", help="train a teacher (teacher.kind = edm | flow) on data.*",
                           description="Train a teacher into RUN_DIR/teacher (resumes if interrupted). Runs under "
                                       "torchrun for DDP.", epilog=CONFIG_HELP, formatter_class=fmt)
    _add_config_args(p)
    p.set_defaults(func=cmd_teacher_train)

    p = sub.add_parser("pairs", help="write (noise, teacher sample) pairs to a sharded store",
                       description="Run the teacher's deterministic ODE solver (teacher.solver, teacher.steps) on "
                                   "seeded noise; write pairs.n pairs into RUN_DIR/pairs. Resumes after a kill; "
                                   "shards are split across torchrun ranks.", epilog=CONFIG_HELP, formatter_class=fmt)
    _add_config_args(p)
    p.add_argument("--teacher", type=Path, default=None, help="teacher model file (default RUN_DIR/teacher/model.safetensors)")
    p.add_argument("--out", type=Path, default=None, help="pair store folder (default RUN_DIR/pairs)")
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("train", help="train an LMM student on a pair store",
                       description="Train the endpoint predictor on the lines between paired noise and teacher "
                                   "samples (student.*) into RUN_DIR/student.", epilog=CONFIG_HELP, formatter_class=fmt)
    _add_config_args(p)
    p.add_argument("--pairs", type=Path, default=None, help="pair store folder (default RUN_DIR/pairs)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="teacher file for student.init=teacher (default: the one recorded in the store)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample a teacher or a student", formatter_class=fmt,
                       description="Draw samples into an .npz (images uint8 N x H x W x C, labels when conditional) "
                                   "and a PNG grid beside it.")
    p.add_argument("--model", type=Path, required=True, help="model.safetensors (teacher or student) or its run folder")
    p.add_argument("--out", type=Path, required=True, help="output .npz path")
    p.add_argument("-n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--nfe", type=int, default=None,
                   help="student: number of steps (default 1); teacher: solver steps if --steps is not given")
    p.add_argument("--grid", default=None, help="student time grid, comma separated, e.g. 0,0.5 (default for NFE)")
    p.add_argument("--mode", choices=["line", "restart"], default="line",
                   help="student: step along the line (default) or restart from fresh noise each step")
    p.add_argument("--solver", choices=list(METHODS), default=None,
                   help="teacher ODE solver (default: the teacher's own)")
    p.add_argument("--steps", type=int, default=None, help="teacher solver steps (default: the teacher's own)")
    p.add_argument("--schedule", choices=list(SCHEDULES), default=None,
                   help="teacher time grid: edm (EDM's, last call at sigma_min) or trimmed (that call moved to where "
                        "it changes the sample; better at few steps) (default: the teacher's own)")
    p.add_argument("--batch-size", type=int, default=500, help="samples per batch (default 500)")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast: auto = on for GPUs and CPUs with native bf16 (AVX-512 BF16, AMX) (default auto)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="score sample files or a model at several NFE against a dataset",
                       description="Frechet distance (eval.features: inception = FID, proxy, pixel) and precision/"
                                   "recall of --samples files and/or --model sampled at each --nfe (teachers: each of "
                                   "eval.teacher_solvers with the most steps that fit, trimmed grid; students: their "
                                   "own grid or the default grid), against data.* "
                                   "(data.split picks train or test).", epilog=CONFIG_HELP, formatter_class=fmt)
    _add_config_args(p)
    p.add_argument("--samples", type=Path, nargs="*", default=[], help=".npz files from lmm sample (key 'images')")
    p.add_argument("--model", type=Path, default=None, help="teacher or student model file or run folder")
    p.add_argument("--nfe", default="1,2", help="comma-separated NFE list for --model (default 1,2)")
    p.add_argument("--ref", type=Path, default=None,
                   help="score against this reference statistics file alone (from --ref-cache or a run's "
                        "reference-*.npz), without reading the dataset; refused if made by another network")
    p.add_argument("--ref-cache", type=Path, default=None,
                   help="reference statistics .npz: reused if made by the same network and data, else refused; "
                        "written if absent")
    p.add_argument("--out", type=Path, default=Path("metrics.json"),
                   help="output JSON (default metrics.json); with --model, OUT.svg gets the distance-against-NFE plot")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the whole pipeline on a preset (default: digits, ~10 min on 2 CPU cores)",
                       description="Train a teacher, make pairs, train a student, sample at NFE 1 and 2, evaluate, "
                                   "and write RUN_DIR/report.html.", epilog=CONFIG_HELP, formatter_class=fmt)
    _add_config_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="build RUN_DIR/report.html from a run folder")
    p.add_argument("run_dir", type=Path, help="run folder (e.g. runs/demo)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        return 0
    except (ConfigError, FileNotFoundError, ValueError, FloatingPointError) as err:
        print(f"lmm: error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())

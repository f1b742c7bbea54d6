"""The `lmm` command: one subcommand per pipeline stage. Run `lmm SUBCOMMAND --help` for each one's options."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from lmm import dist
from lmm.config import ConfigError, flat_keys, load_config
from lmm.io import save_json
from lmm.solvers import METHODS
from lmm.teachers.base import SCHEDULES

BF16 = {"auto": "auto", "true": True, "false": False}
CONFIG_HELP = """Config: a TOML preset (-c, e.g. configs/fashion_mnist.toml; default: the embedded digits
preset) and any number of KEY=VALUE overrides (e.g. teacher.train.steps=500 run.dir=runs/x
student.grid=[0.0,0.6]). `lmm config` prints every key with its value; an unknown key is an error."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, default=None, help="TOML preset (default: embedded digits preset)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. run.dir=runs/x")


def _config(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.overrides)
    return cfg


def _stage(cfg: dict, name: str):
    """Time a stage into RUN_DIR/timings.json (the report's time per stage), as `lmm demo` does."""
    from lmm.runs import Timer

    return Timer(Path(cfg["run"]["dir"]) / "timings.json").stage(name)


def cmd_config(args: argparse.Namespace) -> None:
    for key, value in flat_keys(_config(args)):
        print(f"{key} = {json.dumps(value)}")


def _run_stage(args: argparse.Namespace, stage: str, timing: str, run) -> None:
    """Run one stage on the config of `args`, time it, then record the keys it used in RUN/config.json."""
    from lmm import pipeline
    from lmm.runs import record_config

    cfg = _config(args)
    with _stage(cfg, timing):
        path = run(pipeline, cfg)
    record_config(cfg, stage)
    if dist.is_main():
        print(path)


def cmd_teacher_train(args: argparse.Namespace) -> None:
    _run_stage(args, "teacher", "train teacher", lambda pipeline, cfg: pipeline.train_teacher(cfg))


def cmd_pairs(args: argparse.Namespace) -> None:
    _run_stage(args, "pairs", "generate pairs",
               lambda pipeline, cfg: pipeline.generate_pairs(cfg, teacher_path=args.teacher, store=args.out))


def cmd_train(args: argparse.Namespace) -> None:
    _run_stage(args, "student", "train student",
               lambda pipeline, cfg: pipeline.train_student(cfg, store=args.pairs, teacher_path=args.teacher))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _nfe_list(text: str) -> list[int]:
    return [_positive_int(k) for k in text.split(",")]


def _grid_arg(text: str) -> list[float]:
    from lmm.sampling import check_grid

    try:
        return check_grid([float(t) for t in text.split(",")])
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def _sampler(args: argparse.Namespace, meta: dict, singular_end: bool) -> dict:
    """The sampler `lmm sample` runs, from its flags and the model file; contradicting flags are an error."""
    from lmm.sampling import grid_for
    from lmm.solvers import expected_nfe, steps_within

    if meta["role"] != "teacher":
        if args.solver or args.steps or args.schedule:
            raise ValueError("--solver/--steps/--schedule apply to teachers; students take --nfe, --grid and --mode")
        if args.grid is not None and args.nfe is not None and len(args.grid) != args.nfe:
            raise ValueError(f"--nfe {args.nfe} contradicts --grid {','.join(map(str, args.grid))} "
                             f"({len(args.grid)} steps): give one, or both agreeing")
        grid = args.grid or grid_for(args.nfe or 1, meta["objective_kwargs"].get("grid", ()))
        return {"solver": "lines", "grid": grid, "mode": args.mode}
    if args.grid is not None or args.mode is not None:
        raise ValueError("--grid and --mode apply to students; teachers take --solver, --steps or --nfe, --schedule")
    if args.nfe is not None and args.steps is not None:
        raise ValueError("give a teacher --steps or --nfe, not both (--nfe takes the most steps that fit in it)")
    t = meta["teacher"]
    solver, steps = args.solver or t["solver"], args.steps or t["steps"]
    if args.nfe is not None:
        steps = steps_within(solver, args.nfe, singular_end)
        if steps == 0:
            raise ValueError(f"--nfe {args.nfe}: solver {solver} needs at least {expected_nfe(solver, 1, singular_end)}")
    return {"solver": solver, "steps": steps, "schedule": args.schedule or t.get("schedule", "edm")}


def _seed_list(text: str) -> list[int]:
    """--seeds: comma-separated seeds and inclusive ranges A-B (e.g. 0-49999 or 0,5,7-9), each seed once."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not match:
            raise argparse.ArgumentTypeError(f"expected seeds and ranges such as 0-49999 or 0,5,7-9, got {text!r}")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise argparse.ArgumentTypeError(f"range {part.strip()!r} runs backwards; write {high}-{low}")
        if high >= 2**63:
            raise argparse.ArgumentTypeError(f"seed {high} is too large; seeds lie in 0..{2**63 - 1}")
        seeds.extend(range(low, high + 1))
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} lists a seed more than once; each seed makes one image")
    return seeds


def _check_sample_out(out: Path, fmt: str) -> None:
    """Refuse an --out that does not suit --format, before any work."""
    if fmt == "npz":
        if out.suffix != ".npz" or out.is_dir():
            raise ValueError(f"--out {out}: name an .npz file (the samples; their PNG grid is written beside it), "
                             "or a folder with --format png (one PNG file per image)")
    elif out.suffix in (".npz", ".png"):
        raise ValueError(f"--out {out}: --format png writes one PNG file per image into a folder; name a folder, "
                         "or an .npz file without --format png")
    elif out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; --format png writes into a new or empty folder")
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out}: the folder is not empty; --format png writes into a new or empty folder")


def cmd_sample(args: argparse.Namespace) -> None:
    from lmm.generate import sample, save_png_folder, save_samples
    from lmm.models import load_model

    run = _config(args)["run"]
    if args.seeds is not None and (args.n is not None or args.seed is not None):
        raise ValueError("--seeds gives each image its own seed; -n and --seed draw N images from one seed: "
                         "give --seeds or -n/--seed, not both")
    _check_sample_out(args.out, args.format)
    deterministic = run["deterministic"] if args.deterministic is None else args.deterministic
    device = dist.init_distributed(args.device or run["device"], deterministic=deterministic).device
    model, meta = load_model(args.model, device)
    if args.format == "png" and len(meta["data_shape"]) != 3:
        raise ValueError(f"--format png: {args.model} samples vectors of shape {tuple(meta['data_shape'])}, not "
                         "images; write an .npz (--format npz)")
    how = _sampler(args, meta, getattr(model, "singular_end", False))
    bf16 = dist.resolve_bf16(run["bf16"] if args.bf16 is None else BF16[args.bf16], device)
    draw = {"seeds": args.seeds} if args.seeds is not None else {
        "n": 64 if args.n is None else args.n, "seed": 0 if args.seed is None else args.seed}
    result = sample(model, **draw, batch_size=args.batch_size, bf16=bf16, device=device,
                    progress=dist.is_main() and run["progress"], label=args.label,
                    compile=dist.resolve_compile(run["compile"], device), **how)
    if dist.is_main():
        path = (save_png_folder if args.format == "png" else save_samples)(result, args.out)
        print(f"{path}: {len(result['images'])} samples, NFE {result['nfe']}")


def _compare_row(text: str) -> tuple[Path, int | None]:
    """--model of `lmm compare`: PATH or PATH@NFE."""
    path, sep, nfe = text.rpartition("@")
    if sep and nfe.isdigit():
        if int(nfe) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: NFE must be >= 1")
        return Path(path), int(nfe)
    return Path(text), None


def cmd_compare(args: argparse.Namespace) -> None:
    from types import SimpleNamespace

    from lmm.data.images import save_labelled_rows
    from lmm.generate import sample
    from lmm.models import load_model

    run = _config(args)["run"]
    if args.out.suffix != ".png":
        raise ValueError(f"--out {args.out}: name a .png file")
    device = dist.init_distributed(args.device or run["device"], deterministic=run["deterministic"]).device
    bf16 = dist.resolve_bf16(run["bf16"] if args.bf16 is None else BF16[args.bf16], device)
    rows, shapes = [], set()
    for path, nfe in args.model:
        model, meta = load_model(path, device)
        shapes.add((tuple(meta["data_shape"]), meta.get("num_classes", 0)))
        if len(shapes) > 1:
            raise ValueError(f"--model {path}: its data (shape, classes) {shapes} differs from the rows before it; "
                             "compare models of one dataset")
        if len(meta["data_shape"]) != 3:
            raise ValueError(f"--model {path}: samples vectors of shape {tuple(meta['data_shape'])}, not images")
        flags = SimpleNamespace(nfe=nfe, grid=None, mode=None, solver=None, steps=None, schedule=None)
        how = _sampler(flags, meta, getattr(model, "singular_end", False))
        result = sample(model, seeds=args.seeds, batch_size=args.batch_size, bf16=bf16, device=device,
                        label=args.label, **how)
        name = "/".join((path.parent if path.suffix else path).parts[-2:])
        what = f"{how['solver']} {how['steps']} steps, " if meta["role"] == "teacher" else ""
        rows.append((f"{name}: {what}NFE {result['nfe']}", result["images"]))
    if dist.is_main():
        print(save_labelled_rows(rows, args.out, scale=args.scale))


_OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)+=")


def _overrides_among_files(args: argparse.Namespace, name: str) -> None:
    """Move KEY=VALUE items that a greedy list option (e.g. --samples a.npz b.npz) took to args.overrides."""
    items = getattr(args, name)
    keep = [p for p in items if not (_OVERRIDE.match(str(p)) and not Path(p).exists())]
    args.overrides = [*args.overrides, *(str(p) for p in items if p not in keep)]
    setattr(args, name, keep)


def cmd_eval(args: argparse.Namespace) -> None:
    from lmm.evaluate import evaluate_inputs

    _overrides_among_files(args, "samples")

    if not args.samples and args.model is None:
        raise ValueError("lmm eval needs --samples FILE.npz and/or --model PATH")
    metrics = evaluate_inputs(_config(args), samples=args.samples, model=args.model, nfes=args.nfe,
                              cache=args.ref_cache, ref_file=args.ref)
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


def cmd_convert_edm(args: argparse.Namespace) -> None:
    if not args.trust_pickle:
        raise ValueError(f"{args.snapshot}: EDM pickles carry Python code that a plain unpickler would run; lmm reads "
                         "them with a restricted unpickler that runs none and refuses unknown classes. Pass "
                         "--trust-pickle to confirm you want this file read")
    from lmm.convert import convert_edm

    print(convert_edm(args.snapshot, args.out))


def cmd_report(args: argparse.Namespace) -> None:
    from lmm.report import build_report

    print(build_report(args.run_dir))


def _int_list(text: str, flag: str, low: int) -> list[int]:
    """Comma-separated integers >= low from flag `flag`; ValueError naming the flag otherwise."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if any(v < low for v in values):
        raise ValueError(f"{flag}: every value must be >= {low}, got {text!r}")
    return values


def _float_list(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def cmd_analyze_ot(args: argparse.Namespace) -> None:
    from lmm.analysis.ot import run_ot_analysis

    (seed,) = _int_list(args.seed, "--seed", 0)
    (repeats,) = _int_list(args.repeats, "--repeats", 1)
    thresholds = _float_list(args.threshold, "--threshold")
    if any(not 0 < t < 1 for t in thresholds):
        raise ValueError(f"--threshold: values must lie strictly between 0 and 1, got {args.threshold!r}")
    if args.pairs is not None and not (args.pairs / "manifest.json").is_file():
        raise ValueError(f"--pairs {args.pairs}: no pair store there (manifest.json missing)")
    if args.resolutions is not None and args.pairs is None:
        raise ValueError("--resolutions applies to --pairs; give a pair store")
    result = run_ot_analysis(
        args.out, dims=_int_list(args.dims, "--dims", 1), batches=_int_list(args.batches, "--batches", 2),
        repeats=repeats, thresholds=thresholds, seed=seed, pairs=args.pairs,
        resolutions=None if args.resolutions is None else _int_list(args.resolutions, "--resolutions", 1),
        log=lambda line: print(line, file=sys.stderr))
    print(result["markdown"])
    print(args.out / "ot.json")


def cmd_analyze_singularity(args: argparse.Namespace) -> None:
    from lmm.analysis.singularity import analyze_singularity

    (n,) = _int_list(args.n, "--n", 2)
    (seed,) = _int_list(args.seed, "--seed", 0)
    (steps,) = _int_list(args.steps, "--steps", 1)
    (batch_size,) = _int_list(args.batch_size, "--batch-size", 1)
    device = dist.resolve_device(args.device)
    result = analyze_singularity(args.run_dir, n=n, seed=seed, steps=steps, batch_size=batch_size, device=device)
    print(result["markdown"])
    print(args.run_dir / "analysis" / "singularity.json")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """--batch-size, --bf16 and --device of the commands that sample a model file (sample, compare)."""
    p.add_argument("--batch-size", type=_positive_int, default=500, help="samples per batch (default 500)")
    p.add_argument("--bf16", choices=list(BF16), default=None,
                   help="bf16 autocast: auto = on for GPUs and CPUs with native bf16 (AVX-512 BF16, AMX) "
                        "(default: run.bf16, auto)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: run.device, auto)")


class _Parser(argparse.ArgumentParser):
    """An argument mistake is one line, naming the command and pointing at its --help; exit code 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmm", description="Lines Matching Models: teacher -> pairs -> straight-line student -> few-step samples.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("config", help="print the resolved config (every key)", epilog=CONFIG_HELP, formatter_class=fmt,
                       description="Read the preset (-c, else the embedded digits preset) and the KEY=VALUE overrides, "
                                   "check them as every command does (an unknown key or a wrong value is an error), "
                                   "and print every key of the resolved config, one KEY = VALUE line each (JSON "
                                   "values). Writes no file.")
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

    p = sub.add_parser("train", help="train a student: LMM (default) or a rival method (student.objective)",
                       description="Train the student of student.objective into RUN_DIR/student: lines (LMM: the "
                                   "endpoint predictor on the lines between paired noise and teacher samples) or "
                                   "reflow on the pair store; ot_cfm or consistency (distillation from the teacher) "
                                   "on the dataset (data.*).", epilog=CONFIG_HELP, formatter_class=fmt)
    _add_config_args(p)
    p.add_argument("--pairs", type=Path, default=None, help="pair store folder (default RUN_DIR/pairs)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="teacher file for student.init=teacher and consistency distillation (default: RUN_DIR/teacher, "
                        "or the one recorded in the pair store)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample a teacher or a student", epilog=CONFIG_HELP, formatter_class=fmt,
                       description="Draw samples of a model file into an .npz (images uint8 N x H x W x C, labels "
                                   "when conditional, seeds with --seeds) and a PNG grid beside it, or with --format "
                                   "png into a folder of PNG files, one per image. The config (-c, KEY=VALUE) gives "
                                   "run.device, run.bf16, run.deterministic, run.compile and run.progress; flags "
                                   "win.")
    _add_config_args(p)
    p.add_argument("--model", type=Path, required=True, help="model.safetensors (teacher or student) or its run folder")
    p.add_argument("--out", type=Path, required=True,
                   help="--format npz: the .npz file (its grid: OUT with .png); --format png: a new or empty folder")
    p.add_argument("--format", choices=["npz", "png"], default="npz",
                   help="npz: one .npz file and a PNG grid beside it; png: one PNG file per image in folder OUT, "
                        "named by its seed (--seeds) or index in 6 digits (000042.png, as NVlabs/edm's generate.py), "
                        "and for conditional models the labels in OUT/dataset.json, EDM dataset_tool's layout "
                        "{\"labels\": [[\"000042.png\", 3], ...]}: a folder EDM's fid.py and other image-folder "
                        "tools read (default npz)")
    p.add_argument("-n", type=_positive_int, default=None, help="number of samples (default 64); not with --seeds")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the one noise stream the N samples are drawn from (default 0); not with --seeds")
    p.add_argument("--seeds", type=_seed_list, default=None,
                   help="one image per seed, e.g. 0-49999 or 0,5,7-9: the image of seed s comes from noise drawn with "
                        "torch.Generator().manual_seed(s) alone, so it is the same in any batch, on any number of "
                        "processes, and sampled alone (--seeds s); its class is --class, else s %% classes. "
                        "Restart-mode students sample these one at a time. Not with -n or --seed")
    p.add_argument("--class", dest="label", type=int, default=None,
                   help="conditional models: sample this class only (default: classes in turn, i %% classes for "
                        "sample i, or s %% classes for seed s with --seeds)")
    p.add_argument("--nfe", type=_positive_int, default=None,
                   help="network calls. Student: its steps (default 1; the grid it was trained on when that has NFE "
                        "times, else the default grid); teacher: the most solver steps that fit in NFE calls")
    p.add_argument("--grid", type=_grid_arg, default=None,
                   help="student time grid 0 = t_0 < ... < t_(K-1) < 1, comma separated, e.g. 0,0.5 (default: see --nfe)")
    p.add_argument("--mode", choices=["line", "restart"], default=None,
                   help="student: step along the line or restart from fresh noise each step (default: the model's own: restart for consistency models, line for the others)")
    p.add_argument("--solver", choices=list(METHODS), default=None,
                   help="teacher ODE solver (default: the teacher's own)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="teacher solver steps (default: the teacher's own); not with --nfe")
    p.add_argument("--schedule", choices=list(SCHEDULES), default=None,
                   help="teacher time grid: edm (EDM's, last call at sigma_min) or trimmed (that call moved to where "
                        "it changes the sample; better at few steps) (default: the teacher's own)")
    _add_sampling_args(p)
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="GPU kernels that repeat bitwise (default: run.deterministic, false: cuDNN autotunes its "
                        "fastest)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("compare", help="teachers and students side by side from the same noise, one labelled PNG",
                       epilog=CONFIG_HELP, formatter_class=fmt,
                       description="Sample each --model from the noise of the same --seeds (as lmm sample --seeds "
                                   "does, so seed s gives each row the same starting noise and class) and write one "
                                   "PNG: a row per model, labelled with its folder, sampler and NFE. The config (-c, "
                                   "KEY=VALUE) gives run.device, run.bf16 and run.deterministic; flags win.")
    _add_config_args(p)
    p.add_argument("--model", type=_compare_row, action="append", required=True,
                   help="a row: model.safetensors or its run folder, optionally @NFE (students: the line sampler at "
                        "NFE calls, default 1; teachers: the most steps of their own solver that fit, default their "
                        "own steps); repeat for more rows, e.g. --model runs/x/teacher --model runs/x/student@1")
    p.add_argument("--seeds", type=_seed_list, default=list(range(12)),
                   help="one column per seed, e.g. 0-11 (default) or 3,7,9; see lmm sample --seeds")
    p.add_argument("--class", dest="label", type=int, default=None,
                   help="conditional models: every column of this class (default: s %% classes for seed s)")
    p.add_argument("--out", type=Path, required=True, help="the .png file to write")
    p.add_argument("--scale", type=_positive_int, default=3, help="upscale each image this many times (default 3)")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help="score sample files or a model at several NFE against a dataset",
                       description="Frechet distance (eval.features: inception = FID, proxy, pixel) and precision/"
                                   "recall of --samples files and/or --model sampled at each --nfe (teachers: each of "
                                   "eval.teacher_solvers with the most steps that fit, trimmed grid; students: their "
                                   "own grid or the default grid), against data.* "
                                   "(data.split picks train or test).", epilog=CONFIG_HELP, formatter_class=fmt)
    _add_config_args(p)
    p.add_argument("--samples", type=Path, nargs="*", default=[],
                   help=".npz files from lmm sample (key 'images'); KEY=VALUE overrides may follow them")
    p.add_argument("--model", type=Path, default=None, help="teacher or student model file or run folder")
    p.add_argument("--nfe", type=_nfe_list, default=[1, 2], help="comma-separated NFE list for --model (default 1,2)")
    p.add_argument("--ref", type=Path, default=None,
                   help="score against this reference statistics file alone, without reading the dataset: "
                        "lmm's (from --ref-cache or a run's reference-*.npz; refused if made by another network) "
                        "or NVlabs EDM's (an .npz of mu and sigma alone, e.g. cifar10-32x32.npz; needs "
                        "eval.features=inception)")
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

    convert = sub.add_parser("convert", help="convert other libraries' checkpoints into lmm model files"
                             ).add_subparsers(dest="convert_command", required=True, metavar="FORMAT")
    p = convert.add_parser("edm", help="an NVlabs EDM network pickle -> an lmm teacher", formatter_class=fmt,
                           description="Read the 'ema' network of an EDM pickle (EDMPrecond, VPPrecond or VEPrecond "
                                       "around SongUNet / DhariwalUNet) with a restricted unpickler that executes "
                                       "nothing, and write OUT/model.safetensors + model.json: a teacher whose sampler "
                                       "is EDM's (Heun, 18 steps = 35 NFE, sigma 80 -> 0.002, rho 7). Use it with "
                                       "`lmm pairs --teacher OUT` and `lmm sample/eval --model OUT`.")
    p.add_argument("snapshot", type=Path, help="EDM pickle, e.g. edm-cifar10-32x32-uncond-vp.pkl")
    p.add_argument("out", type=Path, help="output folder for model.safetensors + model.json")
    p.add_argument("--trust-pickle", action="store_true",
                   help="required: confirms reading a pickle (with the restricted unpickler; nothing is executed)")
    p.set_defaults(func=cmd_convert_edm)

    p = sub.add_parser("report", help="build RUN_DIR/report.html from a run folder", formatter_class=fmt,
                       description="Read what a run folder holds (metrics.json and its sample grids, analysis/, the "
                                   "teacher's and student's training logs, timings.json, config.json) and write "
                                   "RUN_DIR/report.html: one page with the sample grids, metrics against NFE, "
                                   "analyses, loss curves, time per stage and the config. Trains and samples nothing; "
                                   "prints the page's path.")
    p.add_argument("run_dir", type=Path, help="run folder (e.g. runs/demo)")
    p.set_defaults(func=cmd_report)

    analyze = sub.add_parser("analyze", help="the paper's analyses: mini-batch OT pairing, endpoint collapse"
                             ).add_subparsers(dest="analyze_command", required=True, metavar="ANALYSIS")
    p = analyze.add_parser(
        "ot", help="the curse of dimensionality of mini-batch OT pairing", formatter_class=fmt,
        description="Match B noises z ~ N(0, I_d) to B samples of a seeded data Gaussian N(m, S) exactly "
                    "(scipy assignment) and score the pairing against the closed-form OT map T: error = mean "
                    "||x_perm(i) - T(z_i)||^2 / (2 tr S) (1 = independent pairing, 0 = exact). Reports the batch "
                    "needed per dimension for each --threshold and fits log B = a + r d (and a power law). With "
                    "--pairs, also how much of a teacher's coupling z -> x1 mini-batch OT recovers. Writes "
                    "OUT/ot.json, OUT/ot.md and SVG plots.")
    p.add_argument("--dims", default="1,2,4,8,16,32,64", help="comma-separated dimensions d (default 1,2,4,8,16,32,64)")
    p.add_argument("--batches", default=",".join(str(2**k) for k in range(1, 12)),
                   help="comma-separated batch sizes B >= 2; with --pairs, none larger than the store's pair count "
                        "(default 2,4,...,2048)")
    p.add_argument("--repeats", default="4",
                   help="batches drawn at the largest B; smaller B draw more, so that every cell averages over at "
                        "least REPEATS x max(B) pairs (default 4)")
    p.add_argument("--threshold", default="0.5",
                   help="comma-separated error thresholds in (0, 1) for the needed batch and its fit (default 0.5)")
    p.add_argument("--pairs", type=Path, default=None,
                   help="a pair store from `lmm pairs` (e.g. RUN/pairs): also measure OT on the teacher's coupling")
    p.add_argument("--resolutions", default=None,
                   help="with --pairs: comma-separated resolutions that divide the store's (e.g. 7,14,28); images are "
                        "average-pooled, noise rescaled to unit variance (default: the store's and its halvings "
                        "down to 4)")
    p.add_argument("--seed", default="0", help="seed of the Gaussians and the draws (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=cmd_analyze_ot)

    p = analyze.add_parser(
        "singularity", help="endpoint predictions collapsing toward the data mean near the noise end",
        formatter_class=fmt,
        description="For RUN/teacher (along its own deterministic ODE, written in line time) and RUN/student (along "
                    "the line from z to its one-step endpoint), on seeded noises: the endpoint prediction's RMS "
                    "distance to the data mean and its per-pixel spread across samples, relative to the data's own, "
                    "at line times from 0 to 0.9; and the teacher path's straightness. Writes "
                    "RUN/analysis/singularity.json and .svg plots (shown by `lmm report`).")
    p.add_argument("run_dir", type=Path, help="run folder holding teacher/ and/or student/ and config.json")
    p.add_argument("--n", default="512", help="number of seeded noises (default 512)")
    p.add_argument("--seed", default="0", help="noise seed (default 0)")
    p.add_argument("--steps", default="32",
                   help="uniform Euler steps of the teacher's line-time ODE; the analysis times are added to them "
                        "(default 32)")
    p.add_argument("--batch-size", default="256", help="noises per network call (default 256)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: cuda when a GPU is "
                                                    "visible, else cpu)")
    p.set_defaults(func=cmd_analyze_singularity)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args that also takes KEY=VALUE overrides after options (e.g. `lmm train --pairs P student.x=1`)."""
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if not _OVERRIDE.match(x)]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        from lmm.plugins import load_plugins

        load_plugins()
        args.func(args)
        return 0
    except (ConfigError, FileNotFoundError, ValueError, FloatingPointError) as err:
        print(f"lmm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmm: interrupted. Rerun the same command to resume where it stopped (training from its last "
              "checkpoint, pairs from their finished shards)", file=sys.stderr)
        return 130
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())

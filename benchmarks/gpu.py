"""The pipeline's speed on a GPU for a preset's exact nets, against the bare network, in one run of a few minutes.

For the preset's teacher and student nets (default configs/cifar10-uncond-edm.toml; RANDOM weights; the teacher
written as `lmm convert edm` writes a converted one) and SYNTHETIC data in the preset's data format (CIFAR-10
python batches, downsampled-ImageNet .npz files or an AFHQ image folder), in a temporary folder, it measures, in
this order of priority until --budget-s is spent (the rest are listed as skipped; the run takes the budget, the
measurement under way when it is spent and a few seconds of set-up):
  1. the raw network: forward (no_grad) at pairs.batch_size and forward+backward at student.train.batch_size,
     eager and compiled (torch.compile of the model; with run.compile on, "auto" = on for CUDA);
  2. `lmm pairs`: lmm.pipeline.generate_pairs, what the command runs, with the preset's solver (timed on a second
     store, after a warm-up store of one batch whose time is the first call's);
  3. `lmm train`: lmm.pipeline.train_student with L2 alone and with the preset's loss (student.loss), at the
     preset's batch; rate = the median of the log's samples_per_s (the first step apart: first_step_s);
  4. `lmm sample`: lmm.generate.sample (what the command runs) of the trained student at NFE 1 and 2, batch 500,
     compiled as run.compile says;
  5. forward+backward and `lmm train` (both losses) at 4x the preset's batch.
Each is given as images/s (pairs/s, samples/s), TFLOP/s (the network's FLOPs, counted once per net by
torch.utils.flop_counter.FlopCounterMode; training counts the student net's forward+backward only, not the
perceptual and adversarial networks'), the ratio to the compiled raw network (eager when compile is off) making
the same network calls at the same batch, the first call's seconds (compilation included) and the peak GPU memory.
bf16 autocast follows run.bf16 (auto: on where native). Then the preset's GPU-hours from the measured rates:
pairs.n pairs (pairs.n x NFE network calls) and student.train.steps x batch x --world samples of the preset's loss
(the batch is per process). Writes OUT/gpu.md (the table for BENCHMARKS.md) and OUT/gpu.json.

    python benchmarks/gpu.py [--config configs/cifar10-uncond-edm.toml] [--device auto] [--budget-s 400]
        [--world 1] [--tiny] [--out bench-gpu] [KEY=VALUE ...]

--tiny shrinks the nets (model_channels 16, one level of one block, no attention), the batches and the teacher's
steps (3), for a CPU smoke run: `--tiny --device cpu run.bf16=false`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmm import dist
from lmm.config import load_config
from lmm.generate import sample
from lmm.models import build_model, load_model, student_objective, teacher_objective
from lmm.pipeline import generate_pairs, train_student
from lmm.runs import use_bf16, use_compile
from lmm.solvers import expected_nfe
from lmm.teachers import TEACHERS

SHAPES = {"cifar10": (3, 32, 32), "imagenet64": (3, 64, 64), "afhq": (3, 64, 64)}
CLASSES = {"cifar10": 10, "imagenet64": 1000, "afhq": 3}
TINY_NET = {"model_channels": 16, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}
TINY = ["pairs.batch_size=8", "student.train.batch_size=4", "student.adversarial.width=8", "teacher.steps=3"]


def write_data(root: Path, name: str, n: int) -> None:
    """n synthetic images (random uint8) at root in dataset `name`'s format: CIFAR-10 python batches
    (cifar-10-batches-py/data_batch_1..5, test_batch), downsampled-ImageNet .npz files or AFHQ's train/<class>/ PNGs."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            m = max(1, n // 5)
            raw = {b"data": rng.integers(0, 256, (m, 3072), dtype=np.uint8),
                   b"labels": [int(v) for v in rng.integers(0, 10, m)]}
            (folder / batch).write_bytes(pickle.dumps(raw, protocol=2))
    elif name == "imagenet64":
        _sibling("train_memory").write_imagenet64(root, n)
    elif name == "afhq":
        from PIL import Image

        for k, cls in enumerate(("cat", "dog", "wild")):
            (root / "train" / cls).mkdir(parents=True)
            for i in range(max(1, n // 3)):
                image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                Image.fromarray(image).save(root / "train" / cls / f"{i}.png")
    else:
        raise SystemExit(f"data.name={name!r}: this script writes cifar10, imagenet64 or afhq data")


def _sibling(name: str) -> Any:
    """The benchmark script benchmarks/<name>.py as a module (for its helpers)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Clock:
    """Wall seconds of GPU work (synchronised) and the budget left."""

    def __init__(self, device: torch.device, budget_s: float):
        self.device, self.deadline = device, time.perf_counter() + budget_s

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """(seconds, result) of fn(), from a synchronised start to a synchronised end."""
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)


def raw_rate(clock: Clock, fn: Callable[[], Any], batch: int, min_s: float) -> dict:
    """{first_s: the first call (compilation included), rate: batch x calls / seconds of the calls after a second
    warm-up call (for at least min_s), peak_gib}."""
    clock.reset_peak()
    first, _ = clock.timed(fn)
    fn()
    calls, spent = 0, 0.0
    while spent < min_s or calls < 2:
        seconds, _ = clock.timed(fn)
        calls, spent = calls + 1, spent + seconds
    return {"first_s": first, "rate": batch * calls / spent, "peak_gib": clock.peak_gib()}


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/cifar10-uncond-edm.toml"),
                        help="preset (default configs/cifar10-uncond-edm.toml)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default auto)")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="seconds for the measurements; later ones are skipped when it is spent (default 400)")
    parser.add_argument("--world", type=int, default=1,
                        help="processes the preset's per-process batch trains on, for its GPU-hours (default 1)")
    parser.add_argument("--tiny", action="store_true", help="tiny nets and batches (a CPU smoke run)")
    parser.add_argument("--out", type=Path, default=Path("bench-gpu"), help="folder for gpu.md and gpu.json")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()
    if args.budget_s <= 0 or args.world < 1:
        parser.error("--budget-s must be > 0 and --world >= 1")
    tiny = [f"{role}.net.{k}={json.dumps(v)}" for role in ("teacher", "student") for k, v in TINY_NET.items()] + TINY
    over = [*(tiny if args.tiny else []), *args.overrides, f"run.device={args.device}", "run.progress=false"]
    cfg = load_config(args.config, over)
    _, _, _, device = dist.init_distributed(cfg["run"]["device"], cfg["run"]["deterministic"])
    bf16, compiled = use_bf16(cfg, device), use_compile(cfg, device)
    t, s, d = cfg["teacher"], cfg["student"], cfg["data"]
    if d["name"] not in SHAPES or t["kind"] != "edm":
        raise SystemExit(f"{args.config}: this script runs EDM-teacher presets on cifar10, imagenet64 or afhq data")
    shape, ncls = SHAPES[d["name"]], CLASSES[d["name"]] if d["conditional"] else 0
    b_pairs, b_train = cfg["pairs"]["batch_size"], s["train"]["batch_size"]
    b_sample = 8 if args.tiny else 500
    nfe = expected_nfe(t["solver"], t["steps"], TEACHERS.get(t["kind"]).singular_end)
    min_s = 0.2 if args.tiny else 3.0
    clock = Clock(device, args.budget_s)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    rows: list[dict] = []
    skipped: list[str] = []

    def run(name: str, batch: int, fn: Callable[[], dict], need_s: float) -> dict | None:
        if clock.left() < need_s:
            skipped.append(name)
            return None
        row = {"name": name, "batch": batch, **fn()}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    torch.manual_seed(0)
    model = build_model(teacher_objective(t), t["net"], shape, ncls).to(device)
    student = build_model(student_objective(s, t), s["net"], shape, ncls).to(device)

    def inputs(batch: int) -> tuple:
        x = torch.randn(batch, *shape, device=device)
        y = torch.arange(batch, device=device) % ncls if ncls else None
        return x, torch.full((batch,), 2.0, device=device), y

    def backward(net: Callable, batch: int) -> Callable[[], None]:
        x, _, y = inputs(batch)
        t_line = torch.rand(batch, device=device)

        def step() -> None:
            with autocast():
                loss = net(x, t_line, y).float().square().mean()
            loss.backward()
        return step

    def forward(net: Callable, batch: int) -> Callable[[], torch.Tensor]:
        x, sigma, y = inputs(batch)
        return lambda: _no_grad(net, autocast, x, sigma, y)

    flops = {"forward": count_flops(forward(model, 1)), "forward_backward": count_flops(backward(student.train(), 1))}
    student.zero_grad(set_to_none=True)
    nets = {"eager": (model.eval(), student.train())}
    if compiled:
        nets["compiled"] = (torch.compile(model, dynamic=False), torch.compile(student, dynamic=False))
    raw: dict[tuple[str, str, int], float] = {}

    def raw_rows(batch: int, kind: str) -> None:
        measured = []
        for mode, (fwd_net, train_net) in nets.items():
            fn = forward(fwd_net, batch) if kind == "forward" else backward(train_net, batch)
            row = run(f"raw {kind.replace('_', '+')} ({mode})", batch,
                      lambda: raw_rate(clock, fn, batch, min_s), need_s=min_s + (60 if mode == "compiled" else 5))
            if row is not None:
                raw[kind, mode, batch] = row["rate"]
                row["tflops"] = row["rate"] * flops[kind] / 1e12
                measured.append(row)
        student.zero_grad(set_to_none=True)
        ref = reference(kind, batch)
        for row in measured:
            row["vs_raw"] = row["rate"] / ref if ref else None

    def reference(kind: str, batch: int) -> float | None:
        return raw.get((kind, "compiled" if compiled else "eager", batch))

    raw_rows(b_pairs, "forward")
    raw_rows(b_train, "forward_backward")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_root = work / "data"
        write_data(data_root, d["name"], 300 if args.tiny else 5000)
        teacher_path = _sibling("train_memory").write_teacher(work / "teacher", t["net"], shape, ncls)
        base = [f"data.root={data_root}", f"run.dir={work / 'run'}"]

        def stage_cfg(*extra: str) -> dict:
            return load_config(args.config, [*over, *base, *extra])

        fwd_rate = reference("forward", b_pairs)
        n_pairs = b_pairs * max(2, round((fwd_rate or 1e9) / nfe * (min_s * 5) / b_pairs))

        def store(n: int, name: str) -> None:
            shard = min(n, cfg["pairs"]["shard_size"])
            generate_pairs(stage_cfg(f"pairs.n={n}", f"pairs.shard_size={shard}"), teacher_path=teacher_path,
                           store=work / name)

        def pairs() -> dict:
            clock.reset_peak()
            first, _ = clock.timed(lambda: store(b_pairs, "pairs-warm"))
            seconds, _ = clock.timed(lambda: store(n_pairs, "pairs"))
            rate = n_pairs / seconds
            return {"rate": rate, "tflops": rate * nfe * flops["forward"] / 1e12, "first_s": first,
                    "peak_gib": clock.peak_gib(), "vs_raw": rate * nfe / fwd_rate if fwd_rate else None}

        pair_row = run(f"lmm pairs ({t['solver']}, {nfe} NFE)", b_pairs, pairs, need_s=30)
        students: list[Path] = []

        def training(loss: str, batch: int) -> Callable[[], dict]:
            bwd_rate = reference("forward_backward", batch)
            per_s = (bwd_rate or 1e9) / (1 if loss == "l2" else 3)
            steps = max(4, min(400, round(per_s * min_s * 3 / batch)))
            run_dir = work / f"train-{loss}-{batch}"

            def go() -> dict:
                clock.reset_peak()
                extra = [f"run.dir={run_dir}", f"student.train.batch_size={batch}", f"student.train.steps={steps}",
                         f"student.train.log_every={max(2, steps // 4)}", f"student.train.ckpt_every={steps}"]
                if loss == "l2":
                    extra.append("student.loss={l2=1.0}")
                seconds, path = clock.timed(lambda: train_student(stage_cfg(*extra), store=work / "pairs",
                                                                  teacher_path=teacher_path))
                students.append(path)
                log = [json.loads(line) for line in (run_dir / "student" / "log.jsonl").read_text().splitlines()]
                rate = statistics.median(r["samples_per_s"] for r in log)
                return {"rate": rate, "tflops": rate * flops["forward_backward"] / 1e12,
                        "first_s": log[0]["first_step_s"], "steps": steps, "whole_call_s": seconds,
                        "peak_gib": clock.peak_gib(), "vs_raw": rate / bwd_rate if bwd_rate else None}
            return go

        loss_name = "+".join(s["loss"])
        if pair_row is not None:
            run("lmm train (l2)", b_train, training("l2", b_train), need_s=40)
            run(f"lmm train ({loss_name})", b_train, training("full", b_train), need_s=60)

        def sampling(k: int) -> Callable[[], dict]:
            def go() -> dict:
                student_model, _ = load_model(students[-1], device)
                clock.reset_peak()
                draw = dict(seed=0, batch_size=b_sample, nfe=k, bf16=bf16, device=device,
                            compile=compiled)
                first, _ = clock.timed(lambda: sample(student_model, n=b_sample, **draw))
                n = b_sample * max(2, round((fwd_rate or 1e9) / k * min_s / b_sample))
                seconds, _ = clock.timed(lambda: sample(student_model, n=n, **draw))
                rate = n / seconds
                return {"rate": rate, "tflops": rate * k * flops["forward"] / 1e12, "first_s": first,
                        "peak_gib": clock.peak_gib(),
                        "vs_raw": rate * k / fwd_rate if fwd_rate and b_sample == b_pairs else None}
            return go

        if students:
            for k in (1, 2):
                run(f"lmm sample (NFE {k})", b_sample, sampling(k), need_s=20)
        raw_rows(4 * b_train, "forward_backward")
        if pair_row is not None:
            run("lmm train (l2)", 4 * b_train, training("l2", 4 * b_train), need_s=40)
            run(f"lmm train ({loss_name})", 4 * b_train, training("full", 4 * b_train), need_s=60)

    hours = gpu_hours(cfg, rows, nfe, args.world)
    meta = {"config": str(args.config), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or "cpu", "torch": torch.__version__, "bf16": bf16, "compile": compiled,
            "tiny": args.tiny, "params": sum(p.numel() for p in student.parameters()), "flops_per_image": flops,
            "nfe": nfe, "world": args.world, "skipped": skipped}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps({**meta, "rows": rows, "gpu_hours": hours}, indent=1) + "\n")
    table = markdown(meta, rows, hours)
    (args.out / "gpu.md").write_text(table)
    print(table)


def _no_grad(net: Callable, autocast: Callable, *args: Any) -> torch.Tensor:
    with torch.no_grad(), autocast():
        return net(*args)


def gpu_hours(cfg: dict, rows: list[dict], nfe: int, world: int) -> list[dict]:
    """The config's GPU-hours at the measured rates: its pairs.n pairs at `lmm pairs`' rate, and its
    student.train.steps x batch x world samples at `lmm train`'s rate of its loss at its batch (when measured)."""
    by_name = {(r["name"], r["batch"]): r for r in rows}
    out = []
    pairs = next((r for r in rows if r["name"].startswith("lmm pairs")), None)
    p = cfg["pairs"]
    if pairs is not None:
        out.append({"stage": "pairs", "work": f"{p['n']:,} pairs x {nfe} NFE = {p['n'] * nfe:,} network calls",
                    "rate": pairs["rate"], "gpu_hours": p["n"] / pairs["rate"] / 3600})
    st = cfg["student"]["train"]
    loss_name = "+".join(cfg["student"]["loss"])
    train = by_name.get((f"lmm train ({loss_name})", st["batch_size"]))
    if train is not None:
        samples = st["steps"] * st["batch_size"] * world
        out.append({"stage": f"student ({loss_name})", "work": f"{st['steps']:,} steps x {st['batch_size']} x "
                    f"{world} process(es) = {samples:,} samples", "rate": train["rate"],
                    "gpu_hours": samples / train["rate"] / 3600})
    return out


def markdown(meta: dict, rows: list[dict], hours: list[dict]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    ref = "compiled" if meta["compile"] else "eager: compile off"
    lines = [f"{meta['config']} on {meta['device']} (torch {meta['torch']}, bf16 {meta['bf16']}, compile "
             f"{meta['compile']}{', TINY nets' if meta['tiny'] else ''}): {meta['params'] / 1e6:.3g}M parameters, "
             f"{meta['flops_per_image']['forward'] / 1e9:.2f} GFLOP forward / "
             f"{meta['flops_per_image']['forward_backward'] / 1e9:.2f} GFLOP forward+backward per image",
             "", f"| measurement | batch | images/s | TFLOP/s | x raw net ({ref}) | first call s | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['batch']} | {r['rate']:,.0f} | {fmt(r.get('tflops'), '.1f')} | "
                     f"{fmt(r.get('vs_raw'), '.2f')} | {r['first_s']:.1f} | {fmt(r.get('peak_gib'), '.1f')} |")
    if meta["skipped"]:
        lines += ["", f"skipped (budget spent): {', '.join(meta['skipped'])}"]
    lines += ["", "| stage | work | rate /s | GPU-hours |", "|---|---|---|---|"]
    lines += [f"| {h['stage']} | {h['work']} | {h['rate']:,.0f} | {h['gpu_hours']:,.1f} |" for h in hours]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

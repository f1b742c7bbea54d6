"""Peak RSS of `lmm train` on an ImageNet-64-shaped data set and pair store of full size (1.28M images, 1.28M pairs),
against the same run on a small store: what the data's size adds to the memory of training.

`lmm train` never loads its data whole: ImageNet 64 images stay uint8, memory-mapped from the uncompressed .npz
batches (only the rows of a batch are read), and pairs are streamed from the pair store one window of
student.window shards at a time. This script checks that with the preset's own run (default
configs/imagenet64-cond-edm.toml: the full method, L2 + perceptual + adversarial, whose discriminator reads real
images; class-conditional; the student initialised from the teacher, both EDM's ADM DhariwalUNet, 296M parameters).

Nothing here is real ImageNet: the stores are written in the exact formats with SYNTHETIC content, in a work folder
(a temporary folder made inside --dir, removed at the end unless --keep):
  - imagenet64-{small,full}/: the downsampled-ImageNet .npz format (train_data_batch_1..10.npz with 'data'
    (n, 12288) uint8, 'labels' 1..1000, 'mean'; val_data.npz of 1,000 images), uncompressed (np.savez) as the real
    files are, so lmm memory-maps them; the content is one random block of rows shifted per block (cheap to make).
  - teacher/: the config's teacher net (teacher.net) with RANDOM weights, saved as `lmm convert edm` saves a
    converted EDM teacher (lmm.convert's EDM constructor-argument mapping, lmm.models, lmm.checkpoint.save_model).
  - pairs-{small,full}/: a pair store made by lmm's own pair stage (lmm.pipeline.generate_pairs: its manifest
    names the saved teacher by sha256, so `lmm train` accepts it and initialises the student from it) at the
    config's pairs.shard_size and --dtype, but with a stand-in sampler (tanh of the noise; no teacher calls) and
    only ONE shard generated (plus a short last shard if --pairs is not a multiple of the shard size): every other
    shard file is a HARD LINK of shard 0, with a sidecar of its own index, seed and meta sha256, so the store is
    complete and checksummed (open_pairs verifies every shard's sha256) while it takes one shard of disk (the full
    store: ~63 GB apparent at float16, ~0.5 GB on disk). The linked shards' contents do not match their recorded
    seeds, and the page cache serves every read of the one inode, so read and verification times are optimistic;
    what this measures is the RSS.
Then `python -m lmm.cli.main train -c CONFIG run.dir=... data.root=... --pairs STORE student.train.steps=STEPS
student.train.batch_size=BATCH ... KEY=VALUE...` (= `lmm train`) runs once per store in a subprocess (stdout and
stderr to WORK/train-STORE.log). Its peak RSS is the kernel's high-water mark (ru_maxrss of os.wait4 on the child);
/proc/PID/status is polled every --poll seconds for the anonymous / file-backed split (RssAnon / RssFile at the
polled peak, and the largest RssFile seen). The small store (--small-images, --small-pairs; default one window of
student.window shards, so that both runs fill the same window buffer) differs from the full one in its size only.
The table gives wall time of the whole call, the training loop (from the run's log.jsonl) and one sha256
verification of the store (open_pairs, timed here; `lmm train` verifies it once at start-up).

Memory: the preset's 296M-parameter student + EMA + AdamW take most of it (the teacher it is initialised from is
released before training), plus one tensor group's copy while a checkpoint is written. --max-rss-gib kills a run at a limit (the table then shows where it stopped; "peak RSS through the steps" is still
measured). A smaller net for a machine with less memory: teacher.net.model_channels=128 student.net.model_channels=128
(ADM attention needs model_channels x channel_mult to be multiples of 64 at 32, 16 and 8 pixels: 64, 128 or 192).

    nice -n 19 python benchmarks/train_memory.py [-c configs/imagenet64-cond-edm.toml] [--images 1281167]
        [--pairs 1280000] [--small-images 12811] [--small-pairs N] [--dtype float16] [--steps 2] [--batch 2]
        [--dir DIR] [--keep] [--json OUT] [--stores small,full] [--max-rss-gib G] [--timeout S] [--poll S]
        [KEY=VALUE ...]

Disk: the full store takes ~15.7 GB of images, the teacher and a shard, and each training run writes its checkpoint
(~6 GB for the 296M-parameter preset; removed after the run unless --keep); the free space is checked first.
(a quick smoke run: --images 300 --pairs 64 --small-images 100 --small-pairs 16 --steps 1 pairs.shard_size=16
 plus a tiny net: teacher.net={kind="dhariwalunet",model_channels=16,channel_mult=[1],num_blocks=1,
 attn_resolutions=[]} and the same student.net)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ROW = 3 * 64 * 64
BATCHES = 10
VAL_IMAGES = 1000
BLOCK = 4096
DEFAULT_CONFIG = "configs/imagenet64-cond-edm.toml"


def write_imagenet64(root: Path, n: int, seed: int = 0) -> int:
    """Downsampled ImageNet 64x64 in its .npz format, uncompressed: n train images in BATCHES files
    train_data_batch_1..10.npz ('data' (m, 12288) uint8, 'labels' int64 1..1000, 'mean' float64 (12288,)) and
    val_data.npz ('data', 'labels') of VAL_IMAGES. Synthetic rows: one random block, shifted by a per-block constant.
    Returns the bytes written."""
    root.mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(seed).integers(0, 256, (BLOCK, ROW), dtype=np.uint8)
    mean = base.mean(0)
    start = 0
    for i, size in enumerate(np.array_split(np.arange(n), BATCHES), 1):
        size = len(size)
        data = np.empty((size, ROW), np.uint8)
        for j in range(0, size, BLOCK):
            m = min(BLOCK, size - j)
            np.add(base[:m], (start + j) // BLOCK * 37 % 256, out=data[j:j + m], dtype=np.uint8)
        labels = np.arange(start, start + size, dtype=np.int64) % 1000 + 1
        np.savez(root / f"train_data_batch_{i}.npz", data=data, labels=labels, mean=mean)
        del data
        start += size
    np.savez(root / "val_data.npz", data=base[:VAL_IMAGES].copy(),
             labels=np.arange(VAL_IMAGES, dtype=np.int64) % 1000 + 1)
    return sum(p.stat().st_size for p in root.iterdir())


def write_teacher(out: Path, net_cfg: dict, shape: tuple[int, int, int], ncls: int, seed: int = 0) -> Path:
    """The EDM teacher (EDMPrecond around net_cfg's ADM / DDPM++ net) with random weights, written as `lmm convert
    edm` writes a converted one: the teacher config from EDM's recorded constructor arguments (lmm.convert), model
    meta and file by lmm.models / lmm.checkpoint. Returns OUT/model.safetensors."""
    import torch

    from lmm.checkpoint import save_model
    from lmm.convert import EDM_NETS, EDMObject, _edm_teacher_config
    from lmm.models import build_model, model_meta, teacher_objective

    model_type = {v: k for k, v in EDM_NETS.items()}.get(net_cfg["kind"])
    if model_type is None:
        raise SystemExit(f"teacher.net.kind={net_cfg['kind']!r}: an EDM teacher's net is one of "
                         f"{sorted(EDM_NETS.values())}")
    # the constructor arguments EDM's train.py records in its pickles (what lmm convert edm reads)
    kwargs = dict(img_resolution=shape[1], img_channels=shape[0], label_dim=ncls, use_fp16=False,
                  model_type=model_type, **{k: v for k, v in net_cfg.items() if k != "kind"})
    tcfg, got_shape, got_ncls = _edm_teacher_config(out, EDMObject("EDMPrecond", {"_init_kwargs": kwargs}))
    assert (tcfg["net"], got_shape, got_ncls) == (net_cfg, shape, ncls), (tcfg["net"], got_shape, got_ncls)
    torch.manual_seed(seed)
    objective = teacher_objective(tcfg)
    model = build_model(objective, tcfg["net"], shape, ncls)
    meta = model_meta("teacher", objective, tcfg["net"], shape, ncls, {"teacher": tcfg}, bf16=False)
    meta["source"] = {"format": "synthetic", "class_name": "EDMPrecond",
                      "note": "random weights, written by benchmarks/train_memory.py"}
    out.mkdir(parents=True, exist_ok=True)
    return save_model(out / "model.safetensors", model.state_dict(), meta)


def _stand_in(z, y):
    import torch

    return torch.tanh(z)


def write_pairs(store: Path, cfg: dict, teacher: Path, n_pairs: int, dtype: str) -> dict:
    """A complete pair store of n_pairs made by lmm's pair stage (lmm.pipeline.generate_pairs, so its manifest is
    what `lmm pairs` writes for this teacher) with the stand-in sampler, generating shard 0 (and a short last shard)
    only; every other shard is a hard link of shard 0 with a sidecar of its own. Returns sizes."""
    from lmm import pairs as lmm_pairs
    from lmm import pipeline
    from lmm.io import save_json

    cfg = copy.deepcopy(cfg)
    cfg["pairs"].update(n=n_pairs, dtype=dtype)
    cfg["run"]["progress"] = False
    shard_size = cfg["pairs"]["shard_size"]
    n_shards = math.ceil(n_pairs / shard_size)
    made = sorted({0, n_shards - 1} if n_pairs % shard_size else {0})
    calls: list[tuple[tuple, dict]] = []
    target = [0]

    def one_shard(*args, **kw):  # this process plays rank `target` of n_shards ranks: it makes that shard only
        calls.append((args, kw))
        return lmm_pairs.make_pairs(*args, **{**kw, "rank": target[0], "world": n_shards})

    saved = pipeline.make_pairs, pipeline.teacher_sampler
    pipeline.make_pairs, pipeline.teacher_sampler = one_shard, lambda *a, **k: _stand_in
    try:
        for target[0] in made:
            pipeline.generate_pairs(cfg, teacher_path=teacher, store=store)
    finally:
        pipeline.make_pairs, pipeline.teacher_sampler = saved
    first = json.loads((store / lmm_pairs.sidecar_name(0)).read_text())
    seed = json.loads((store / lmm_pairs.MANIFEST).read_text())["seed"]
    for k in range(n_shards):
        if k in made:
            continue
        os.link(store / lmm_pairs.shard_name(0), store / lmm_pairs.shard_name(k))
        save_json(store / lmm_pairs.sidecar_name(k), {**first, "index": k, "seed": lmm_pairs.shard_seed(seed, k),
                                                      "file": lmm_pairs.shard_name(k)})

    def never(z, y):
        raise AssertionError("every shard exists")

    args, kw = calls[-1]  # list every shard in the manifest, as a finished `lmm pairs` leaves it
    lmm_pairs.make_pairs(args[0], never, **{**kw, "rank": 0, "world": 1, "verify": False})
    files = sorted(store.glob("shard-*.safetensors"))
    inodes = {f.stat().st_ino: f.stat().st_blocks * 512 for f in files}
    return {"pairs": n_pairs, "shards": n_shards, "generated": len(made),
            "apparent_bytes": sum(f.stat().st_size for f in files), "disk_bytes": sum(inodes.values())}


def _status(pid: int) -> dict[str, int]:
    """kB fields of /proc/PID/status (empty once the process is gone or a zombie)."""
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0])
    return out


def run_train(cmd: list[str], log: Path, steps_log: Path, max_rss: int, timeout: float, poll: float) -> dict:
    """Run cmd (stdout + stderr to log) and watch it: peak RSS (ru_maxrss), the polled anon / file split, the
    high-water mark when each training step's line appears in steps_log (the run's log.jsonl, log_every=1; the last
    one is the peak through the training steps, before the final checkpoint is written), the polled timeline
    [[seconds, VmRSS, RssAnon, RssFile MiB], ...], wall time. Killed (SIGKILL)
    when its RSS passes max_rss bytes (0: no limit) or after timeout seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    at_peak: dict[str, int] = {}
    file_max, hwm_by_step, timeline, killed = 0, [], [], None
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            st = _status(proc.pid)
            if "VmRSS" in st:
                file_max = max(file_max, st["RssFile"])
                timeline.append([round(time.perf_counter() - t0, 2), *(round(st[k] / 1024) for k in
                                                                       ("VmRSS", "RssAnon", "RssFile"))])
                if st["VmRSS"] >= at_peak.get("VmRSS", 0):
                    at_peak = st
                if steps_log.is_file():
                    done = sum('"loss"' in line for line in steps_log.read_text().splitlines())
                    hwm_by_step += [st["VmHWM"] / 1024] * (done - len(hwm_by_step))
                if killed is None and max_rss and st["VmRSS"] * 1024 > max_rss:
                    killed = f"killed: RSS passed --max-rss-gib, {st['VmRSS'] / 2**20:.1f} GiB"
                    os.kill(proc.pid, signal.SIGKILL)
            if killed is None and time.perf_counter() - t0 > timeout:
                killed = f"killed: ran past --timeout {timeout:g} s"
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(poll)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "killed": killed, "wall_s": time.perf_counter() - t0,
            "peak_rss_mib": usage.ru_maxrss / 1024, "steps_peak_mib": hwm_by_step[-1] if hwm_by_step else None,
            "hwm_by_step_mib": hwm_by_step, "polled_peak_mib": at_peak.get("VmRSS", 0) / 1024,
            "anon_mib": at_peak.get("RssAnon", 0) / 1024, "file_mib": at_peak.get("RssFile", 0) / 1024,
            "shmem_mib": at_peak.get("RssShmem", 0) / 1024, "file_max_mib": file_max / 1024,
            "timeline": timeline}


def in_child(fn, *args):
    """fn(*args) in a fresh (spawned) process, so that what building the stores allocated is not held here."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def verify_seconds(store: Path) -> float:
    from lmm.pairs import open_pairs

    t0 = time.perf_counter()
    open_pairs(store)
    return time.perf_counter() - t0


def machine() -> dict:
    import torch

    from lmm.dist import native_bf16

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "bf16_native": native_bf16(torch.device("cpu")),
            "mem_gib": round(mem / 2**20, 1),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"the run's preset (default {DEFAULT_CONFIG}); "
                   "data.name must be imagenet64")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, applied to the teacher written here and passed on to `lmm train` after "
                        "this script's own (run.dir, data.root, run.progress, student.train.*), so they win")
    p.add_argument("--images", type=int, default=1_281_167, help="images of the full data set (default 1,281,167: "
                   "ImageNet-1k train), in 10 .npz batches")
    p.add_argument("--pairs", type=int, default=1_280_000, help="pairs of the full pair store (default 1,280,000)")
    p.add_argument("--small-images", type=int, default=12_811, help="images of the small data set (default 12,811)")
    p.add_argument("--small-pairs", type=int, default=0, help="pairs of the small store (default 0: student.window x "
                   "pairs.shard_size, one window, which the full store's training also fills)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                   help="pair store dtype (default float16, as the ImageNet-64 preset; float32 doubles the store and "
                        "the window buffer)")
    p.add_argument("--steps", type=int, default=2, help="student.train.steps of each run (default 2)")
    p.add_argument("--batch", type=int, default=2, help="student.train.batch_size of each run (default 2)")
    p.add_argument("--dir", default=None, help="folder in which the work folder is made (default: the system's "
                   "temporary folder); the work folder is removed at the end unless --keep")
    p.add_argument("--keep", action="store_true", help="keep the work folder (stores, teacher, run folders with "
                   "their checkpoints and logs)")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    p.add_argument("--max-rss-gib", type=float, default=0.0, help="kill a training run whose RSS passes this many "
                   "GiB and report it (default 0: no limit)")
    p.add_argument("--stores", default="small,full", help="which stores to build and train on, in order (default "
                   "small,full)")
    p.add_argument("--timeout", type=float, default=3600.0, help="kill a training run after this many seconds "
                   "(default 3600)")
    p.add_argument("--poll", type=float, default=0.2, help="seconds between reads of the child's /proc status "
                   "(default 0.2)")
    args = p.parse_args()

    import torch

    from lmm.config import load_config
    from lmm.data.imagenet64 import IMAGENET64_CLASSES
    from lmm.models import build_model, teacher_objective

    cfg = load_config(args.config, args.overrides)
    if cfg["data"]["name"] != "imagenet64":
        raise SystemExit(f"{args.config}: data.name is {cfg['data']['name']!r}; this benchmark writes imagenet64")
    shape, ncls = (3, 64, 64), IMAGENET64_CLASSES if cfg["data"]["conditional"] else 0
    shard_size, window = cfg["pairs"]["shard_size"], cfg["student"]["window"]
    small_pairs = args.small_pairs or window * shard_size
    pair_bytes = 2 * math.prod(shape) * (2 if args.dtype == "float16" else 4)
    with torch.device("meta"):
        n_params = sum(q.numel() for q in build_model(teacher_objective(cfg["teacher"]), cfg["teacher"]["net"],
                                                      shape, ncls).parameters())
    sizes_of = {"small": (args.small_images, small_pairs), "full": (args.images, args.pairs)}
    names = [s for s in args.stores.split(",") if s]
    if not names or set(names) - set(sizes_of):
        raise SystemExit(f"--stores {args.stores!r}: a comma-separated list of small, full")
    stores = [(name, *sizes_of[name]) for name in names]
    # images, one (or two) shards per store, the teacher, and a run's checkpoint + model (~5x the weights)
    need = (sum(n * ROW * 1.001 + 2 * shard_size * pair_bytes for _, n, _ in stores) + 6 * 4 * n_params + 2**30)
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir or tempfile.gettempdir()).free
    if free < need:
        raise SystemExit(f"not enough disk: this needs about {need / 1e9:.1f} GB in "
                         f"{args.dir or tempfile.gettempdir()}, "
                         f"{free / 1e9:.1f} GB are free; use --dir elsewhere or smaller --images")
    work = Path(tempfile.mkdtemp(prefix="lmm-train-memory-", dir=args.dir))
    info = {"config": str(args.config), "overrides": args.overrides, "steps": args.steps, "batch": args.batch,
            "dtype": args.dtype, "params_m": n_params / 1e6, "teacher_net": cfg["teacher"]["net"],
            "student_net": cfg["student"]["net"], "loss": cfg["student"]["loss"], "window": window,
            "shard_size": shard_size, "machine": machine(), "work": str(work)}
    print(f"work folder {work}; {args.config} {' '.join(args.overrides)}\nnet {cfg['student']['net']} "
          f"({n_params / 1e6:.1f}M parameters), loss {cfg['student']['loss']}, batch {args.batch}, {args.steps} steps",
          flush=True)
    rows = []
    try:
        t0 = time.perf_counter()
        teacher = in_child(write_teacher, work / "teacher", cfg["teacher"]["net"], shape, ncls)
        print(f"teacher {teacher} ({teacher.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s",
              flush=True)
        for name, n_images, n_pairs in stores:
            t0 = time.perf_counter()
            data_bytes = in_child(write_imagenet64, work / f"imagenet64-{name}", n_images)
            t1 = time.perf_counter()
            store = work / f"pairs-{name}"
            sizes = in_child(write_pairs, store, cfg, teacher, n_pairs, args.dtype)
            t2 = time.perf_counter()
            verify_s = in_child(verify_seconds, store)
            print(f"{name}: {n_images:,} images ({data_bytes / 1e9:.2f} GB) in {t1 - t0:.0f} s; {n_pairs:,} pairs in "
                  f"{sizes['shards']} shards ({sizes['apparent_bytes'] / 1e9:.2f} GB apparent, "
                  f"{sizes['disk_bytes'] / 1e9:.2f} GB on disk) in {t2 - t1:.0f} s; one open_pairs (sha256 of every "
                  f"shard) {verify_s:.1f} s", flush=True)
            run = work / f"run-{name}"
            cmd = [sys.executable, "-m", "lmm.cli.main", "train", "-c", str(args.config), f"run.dir={run}",
                   f"data.root={work / f'imagenet64-{name}'}", "run.progress=false",
                   f"student.train.steps={args.steps}", f"student.train.batch_size={args.batch}",
                   f"student.train.ckpt_every={args.steps}", "student.train.log_every=1", *args.overrides,
                   "--pairs", str(store)]
            log = run / "student" / "log.jsonl"
            r = run_train(cmd, work / f"train-{name}.log", log, int(args.max_rss_gib * 2**30), args.timeout, args.poll)
            steps = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
            steps = [s for s in steps if "loss" in s]
            row = {"store": name, "images": n_images, "data_bytes": data_bytes, **sizes, "verify_s": verify_s,
                   **r, "loop_s": steps[-1]["time"] if steps else None, "steps_done": len(steps)}
            rows.append(row)
            print(f"{name}: rc {r['rc']}{' (' + r['killed'] + ')' if r['killed'] else ''}, peak RSS "
                  f"{r['peak_rss_mib']:.0f} MiB, wall {r['wall_s']:.0f} s", flush=True)
            if r["rc"] != 0:
                tail = (work / f"train-{name}.log").read_text()[-3000:]
                print(f"--- {work / f'train-{name}.log'} (tail) ---\n{tail}", file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(run / "student" / "checkpoints", ignore_errors=True)
                shutil.rmtree(work / f"imagenet64-{name}", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    notes = [
        ("SYNTHETIC stores in the exact formats (downsampled-ImageNet .npz, uncompressed; lmm pair store); the teacher "
         "has random weights"),
        ("pair shards are hard links of one shard: contents do not match their recorded seeds, and the page cache "
         "serves repeated reads of the one inode (read / verify times are optimistic; RSS is what is measured)"),
        (f"peak RSS = ru_maxrss of the child; anon / file = RssAnon / RssFile when the polled RSS (every {args.poll:g} "
         "s) was highest; 'through the steps' = the high-water mark polled when the last step's line appeared in "
         "log.jsonl, before train() writes its final checkpoint"),
    ]
    print(f"\n{cfg['student']['net']['kind']} {n_params / 1e6:.1f}M parameters, loss {cfg['student']['loss']}, "
          f"batch {args.batch}, {args.steps} steps, pairs {args.dtype} x {shard_size} per shard, window {window}; "
          f"{info['machine']['cpu']}, {info['machine']['cores']} cores, bf16 native: {info['machine']['bf16_native']}")
    print("| store | images | pairs (shards) | apparent GB (images + pairs) | peak RSS MiB | peak RSS through the "
          "steps MiB | anon / file MiB at peak | wall s | train loop s | verify s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        status = "" if r["rc"] == 0 else f" ({r['killed'] or 'exit ' + str(r['rc'])})"
        loop = "-" if r["loop_s"] is None else f"{r['loop_s']:.0f}"
        steps_peak = "-" if r["steps_peak_mib"] is None else f"{r['steps_peak_mib']:.0f}"
        print(f"| {r['store']} | {r['images']:,} | {r['pairs']:,} ({r['shards']}) | "
              f"{(r['data_bytes'] + r['apparent_bytes']) / 1e9:.1f} | {r['peak_rss_mib']:.0f}{status} | {steps_peak} | "
              f"{r['anon_mib']:.0f} / {r['file_mib']:.0f} | {r['wall_s']:.0f} | {loop} | {r['verify_s']:.1f} |")
    if [r["store"] for r in rows] == ["small", "full"]:
        small, full = rows
        diff = f"full - small: {full['peak_rss_mib'] - small['peak_rss_mib']:+.0f} MiB peak RSS"
        if small["steps_peak_mib"] is not None and full["steps_peak_mib"] is not None:
            diff += f", {full['steps_peak_mib'] - small['steps_peak_mib']:+.0f} MiB through the steps"
        print(f"\n{diff}")
    for note in notes:
        print(f"- {note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**info, "rows": rows, "notes": notes}, indent=2) + "\n")
    if any(r["rc"] != 0 for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

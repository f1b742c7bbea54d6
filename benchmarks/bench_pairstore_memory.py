"""Peak memory of streaming one epoch through PairSource for stores of N and 10N pairs.

Builds both stores in a temporary directory, then iterates each in a fresh subprocess and reads its peak
RSS (VmHWM). With windowed streaming the peak should stay flat as the store grows.

    python benchmarks/bench_pairstore_memory.py --n 20000 --shape 3,32,32 [--shard-size 1000] [--window 4]
        [--batch 256] [--dir DIR]

(a quick smoke run: --n 200 --shape 1,8,8 --shard-size 100)
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def iterate(store: str, seed: int, window: int, batch: int) -> dict:
    """One epoch through PairSource in this process; memory in MiB."""
    import torch

    from lmm.pairs import PairSource

    base = _vm_kib("VmRSS")
    src = PairSource(store, seed=seed, window=window)
    t0 = time.perf_counter()
    total = 0.0
    for step in range(math.ceil(len(src) / batch)):
        b = src.batch(step, 0, 1, batch)
        total += float(b["x1"].sum() - b["z"].sum())
    seconds = time.perf_counter() - t0
    assert torch.isfinite(torch.tensor(total))
    return {"base_mib": base / 1024, "peak_mib": _vm_kib("VmHWM") / 1024, "epoch_s": seconds}


def build(store: Path, n: int, shape: tuple[int, ...], shard_size: int) -> float:
    import torch

    from lmm.pairs import make_pairs

    t0 = time.perf_counter()
    make_pairs(
        store, lambda z, y: torch.tanh(z) * 0.5, n_pairs=n, shard_size=shard_size, data_shape=shape,
        num_classes=0, seed=0, meta={"teacher": {"kind": "tanh-bench"}}, batch_size=shard_size,
        progress=False,
    )
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000, help="pairs in the small store; the large one has 10x")
    p.add_argument("--shape", default="3,32,32", help="data shape, comma separated (default 3,32,32)")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per shard (default 1000)")
    p.add_argument("--window", type=int, default=4, help="PairSource window: shards held at once (default 4)")
    p.add_argument("--batch", type=int, default=256, help="pairs per batch drawn while iterating (default 256)")
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed after)")
    p.add_argument("--iterate", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.iterate:
        print(json.dumps(iterate(args.iterate, 0, args.window, args.batch)))
        return
    shape = tuple(int(s) for s in args.shape.split(","))
    work = Path(args.dir or tempfile.mkdtemp(prefix="lmm-bench-pairs-"))
    pair_mib = 2 * 4 * math.prod(shape) / 2**20
    rows = []
    try:
        for n in (args.n, 10 * args.n):
            store = work / f"pairs-{n}"
            build_s = build(store, n, shape, args.shard_size)
            disk = sum(f.stat().st_size for f in store.iterdir()) / 2**20
            out = subprocess.run(
                [sys.executable, __file__, "--iterate", str(store), "--window", str(args.window),
                 "--batch", str(args.batch)],
                check=True, capture_output=True, text=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((n, disk, build_s, r["epoch_s"], r["base_mib"], r["peak_mib"]))
            shutil.rmtree(store)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"shape {shape} float32, shard_size {args.shard_size}, window {args.window} "
          f"(window holds {args.window * args.shard_size * pair_mib:.0f} MiB of pairs), batch {args.batch}")
    print(f"{'pairs':>8} {'store MiB':>10} {'build s':>8} {'epoch s':>8} {'RSS after import MiB':>21} {'peak RSS MiB':>13}")
    for n, disk, b, e, base, peak in rows:
        print(f"{n:>8} {disk:>10.0f} {b:>8.1f} {e:>8.1f} {base:>21.0f} {peak:>13.0f}")


if __name__ == "__main__":
    main()

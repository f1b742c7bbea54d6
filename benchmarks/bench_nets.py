"""Throughput of the raw networks: forward+backward (training step without optimizer) and no-grad forward.

Usage:

    python benchmarks/bench_nets.py [--threads 2] [--batch 256] [--reps 5] [--device cpu] [--only NAME,...]

Prints one line per preset: parameters, GFLOP per fwd+bwd, milliseconds, achieved GFLOP/s.
Presets: digits-c16-b1, digits-c32-b1, digits-c32-b2, digits-c64-b2, fmnist-c32-b2, toy-mlp-256x4.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from lmm.nets import build_net

PRESETS: list[tuple[str, dict, tuple[int, ...]]] = [
    ("digits-c16-b1", dict(kind="unet", channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]), (1, 8, 8)),
    ("digits-c32-b1", dict(kind="unet", channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]), (1, 8, 8)),
    ("digits-c32-b2", dict(kind="unet", channels=32, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4]), (1, 8, 8)),
    ("digits-c64-b2", dict(kind="unet", channels=64, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4]), (1, 8, 8)),
    ("fmnist-c32-b2", dict(kind="unet", channels=32, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[7]), (1, 28, 28)),
    ("toy-mlp-256x4", dict(kind="mlp", width=256, depth=4), (2,)),
]


def _time(fn, reps: int, sync) -> float:
    fn()
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch.set_num_threads (default: torch's, %(default)s here)")
    parser.add_argument("--batch", type=int, default=256, help="batch size of every timed call (default 256)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions after two warm-up calls (default 5)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--only", default="", help="comma-separated preset names (default: all); known: "
                        + ", ".join(name for name, _, _ in PRESETS))
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    unknown = only - {name for name, _, _ in PRESETS}
    if unknown:
        parser.error(f"--only: unknown preset(s) {', '.join(sorted(unknown))}")
    if args.batch < 1 or args.reps < 1:
        parser.error("--batch and --reps must be >= 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device={device} threads={args.threads} batch={args.batch}")
    for name, cfg, shape in PRESETS:
        if only and name not in only:
            continue
        torch.manual_seed(0)
        net = build_net(cfg, shape, 10).to(device)
        x = torch.randn(args.batch, *shape, device=device)
        t = torch.rand(args.batch, device=device) * 1000
        y = torch.randint(0, 10, (args.batch,), device=device)

        def step() -> None:
            net.zero_grad(set_to_none=True)
            (net(x, t, y) - x).square().mean().backward()

        def forward() -> None:
            with torch.no_grad():
                net(x, t, y)

        with FlopCounterMode(display=False) as counter:
            step()
        gflop = counter.get_total_flops() / 1e9
        train_s = _time(step, args.reps, sync)
        fwd_s = _time(forward, args.reps, sync)
        params = sum(p.numel() for p in net.parameters())
        print(f"{name:15s} params={params / 1e6:6.3f}M  fwd+bwd {gflop:7.2f} GFLOP {train_s * 1e3:8.1f} ms "
              f"({gflop / train_s:6.1f} GFLOP/s)  fwd {fwd_s * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()

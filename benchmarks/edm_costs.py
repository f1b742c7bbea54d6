"""What the EDM presets cost: network size, FLOPs per call, measured seconds per call here, and GPU-hour estimates.

For each preset (its teacher net, which its student copies): parameters; forward FLOPs per image counted by
torch.utils.flop_counter (convolutions and matmuls, 2 FLOPs per multiply-add); the measured wall time of one
forward pass per image on this machine (batch --batch, bf16 autocast where the CPU has native bf16, else
float32, median of --repeats); then the pair generation cost per image (teacher.steps of teacher.solver, in NFE)
and projections for pairs.n pairs and for student training (student.train.steps x 8 processes x batch, 3x the
forward FLOPs for forward + backward, the student net only: the perceptual and adversarial networks add to it)
on one GPU of --gpu-tflops peak bf16 at --mfu utilisation. The projections are arithmetic, not measurements.

    python benchmarks/edm_costs.py [--presets configs/cifar10-uncond-edm.toml,...] [--batch 8] [--repeats 3]
        [--gpu-tflops 989] [--mfu 0.4]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from lmm.config import load_config
from lmm.dist import resolve_bf16
from lmm.models import build_model, teacher_objective
from lmm.solvers import expected_nfe

PRESETS = ["configs/cifar10-uncond-edm.toml", "configs/cifar10-cond-edm.toml", "configs/afhq64-edm.toml",
           "configs/imagenet64-cond-edm.toml"]
SHAPES = {"cifar10": (3, 32, 32), "afhq": (3, 64, 64), "imagenet64": (3, 64, 64)}
CLASSES = {"cifar10": 10, "afhq": 3, "imagenet64": 1000}


@torch.no_grad()
def measure(preset: Path, batch: int, repeats: int) -> dict:
    cfg = load_config(preset, [])
    t, d = cfg["teacher"], cfg["data"]
    shape, ncls = SHAPES[d["name"]], CLASSES[d["name"]] if d["conditional"] else 0
    model = build_model(teacher_objective(t), t["net"], shape, ncls).eval()
    x, sigma = torch.randn(batch, *shape), torch.full((batch,), 2.0)
    y = torch.arange(batch) % ncls if ncls else None
    with FlopCounterMode(display=False) as counter:
        model(x[:1], sigma[:1], None if y is None else y[:1])
    bf16 = resolve_bf16("auto", torch.device("cpu"))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x, sigma, y)
        times.append((time.perf_counter() - start) / batch)
    nfe = expected_nfe(t["solver"], t["steps"], True)
    s = cfg["student"]["train"]
    return {"preset": preset.name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflops": counter.get_total_flops() / 1e9, "cpu_s_per_call": statistics.median(times[1:]),
            "bf16": bf16, "nfe": nfe, "pairs": cfg["pairs"]["n"],
            "train_images": s["steps"] * s["batch_size"] * 8}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset files (default: the four EDM presets)")
    p.add_argument("--batch", type=int, default=8, help="images per timed forward pass (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes after one warm-up (default 3)")
    p.add_argument("--gpu-tflops", type=float, default=989.0,
                   help="peak dense bf16 TFLOPS of the GPU projected to (default 989: H100/H200 SXM)")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of that peak assumed reached (default 0.4)")
    args = p.parse_args()
    rate = args.gpu_tflops * 1e12 * args.mfu
    print(f"| preset | params (M) | GFLOPs / call / image | CPU s / call / image ({'bf16' if resolve_bf16('auto', torch.device('cpu')) else 'fp32'}) "
          f"| pair NFE | CPU s / pair | pairs | GPU-h pairs | GPU-h training |\n|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        r = measure(Path(preset), args.batch, args.repeats)
        pair_flops = r["gflops"] * 1e9 * r["nfe"]
        gpu_h_pairs = r["pairs"] * pair_flops / rate / 3600
        gpu_h_train = r["train_images"] * 3 * r["gflops"] * 1e9 / rate / 3600
        print(f"| {r['preset']} | {r['params_m']:.2f} | {r['gflops']:.2f} | {r['cpu_s_per_call']:.3f} | {r['nfe']} | "
              f"{r['cpu_s_per_call'] * r['nfe']:.2f} | {r['pairs']:,} | {gpu_h_pairs:.1f} | {gpu_h_train:.1f} |",
              flush=True)
    print(f"\nGPU hours at {args.gpu_tflops:g} TFLOPS x {args.mfu:g} utilisation; training counts the student net only.")


if __name__ == "__main__":
    main()

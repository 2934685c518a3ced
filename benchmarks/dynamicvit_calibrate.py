"""Calibrate DynamicViT predictors for ViT-Tiny on half the shared images, evaluate on the other half.

    python benchmarks/dynamicvit_calibrate.py [--epochs N] [--rho 0.7] [--threads 2]

Sorted image list: even positions calibrate (labels unused), odd positions evaluate. Prints the
calibration time and top-1 / top-5 / agreement (with the unreduced model) of the unreduced
model, calibrated ``dynamicvit``, and training-free ``topk`` with the same per-location token
counts, on the same held-out images.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch

import tokensparse
from tokensparse.data import image_dataset
from tokensparse.measure import ImageNetFolder, evaluate_many
from tokensparse.methods.dynamicvit import describe
from tokensparse.models import create_model
from tokensparse.train.calibrate import CalibrateConfig, calibrate_dynamicvit

ROOT = Path(os.environ.get("TOKENSPARSE_SHARED") or Path(__file__).resolve().parents[2] / "shared")
MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=ROOT / "weights" / f"{MODEL}.safetensors")
    p.add_argument("--images", type=Path, default=ROOT / "data" / "imagenet-sample" / "images")
    p.add_argument("--wnids", type=Path, default=ROOT / "data" / "imagenet-sample" / "wnids.txt")
    p.add_argument("--rho", type=float, default=0.7)
    p.add_argument("--epochs", type=int, default=CalibrateConfig.epochs)
    p.add_argument("--lr", type=float, default=CalibrateConfig.lr)
    p.add_argument("--imitation-epochs", type=int, default=CalibrateConfig.imitation_epochs)
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("dynamicvit_vit_tiny_predictors.safetensors"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    base = create_model(MODEL, weights=args.weights)
    calib = image_dataset(args.images, base, args.wnids, training=False, split="even")
    student = copy.deepcopy(base)
    cfg = CalibrateConfig(epochs=args.epochs, lr=args.lr, flip=not args.no_flip,
                          imitation_epochs=args.imitation_epochs)
    t0 = time.perf_counter()
    calibrate_dynamicvit(student, calib, f"dynamicvit:rho={args.rho}", cfg, out=args.out)
    seconds = time.perf_counter() - t0
    tokens = describe(student)["tokens"]
    print(f"calibrated on {len(calib)} images (even positions), {cfg.epochs} epochs, flip={cfg.flip}, "
          f"lr={cfg.lr}, imitation_epochs={cfg.imitation_epochs}: {seconds:.1f} s ({seconds / 60:.1f} min) with {args.threads} threads -> {args.out}")

    files = ImageNetFolder(args.images, args.wnids).samples
    with tempfile.TemporaryDirectory() as tmp:
        for path, _ in files[1::2]:  # odd positions: held out
            os.symlink(path.resolve(), Path(tmp) / path.name)
        topk = f"topk:tokens=[{','.join(map(str, tokens))}]"
        models = {
            "none": base,
            f"dynamicvit:rho={args.rho} (calibrated)": student,
            f"dynamicvit:rho={args.rho} (random predictors)": tokensparse.patch(
                copy.deepcopy(base), f"dynamicvit:rho={args.rho}"),
            topk: tokensparse.patch(copy.deepcopy(base), topk),
        }
        res = evaluate_many(models, tmp, args.wnids, reference_key="none", batch_size=50)
    print(f"held-out: {len(files[1::2])} images (odd positions); tokens kept per location {tokens}")
    print(f"{'method':45s} {'top-1':>7s} {'top-5':>7s} {'agree':>7s}")
    for name, r in res.items():
        print(f"{name:45s} {r['top1']:7.1f} {r['top5']:7.1f} {r['agreement']:7.1f}")


if __name__ == "__main__":
    main()

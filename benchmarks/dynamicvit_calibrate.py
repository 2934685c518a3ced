"""Calibrate DynamicViT predictors for ViT-Tiny on half the shared images, evaluate on the other half,
in both directions (two folds).

    python benchmarks/dynamicvit_calibrate.py [--fold even --fold odd] [--epochs N] [--views N]
        [--holdout S] [--imitation-target rollout|attention] [--imitation-epochs N] [--rho 0.7] [--threads 2]

Sorted image list: one fold's positions calibrate (read as an unlabelled folder), the other
fold's evaluate. For each fold, prints the calibration time and, on the held-out images,
top-1, agreement with the unreduced model and mean KL(unreduced || reduced) of the
unreduced model, the calibrated ``dynamicvit`` and training-free ``topk`` keeping the same
number of tokens at the same blocks; then how much agreement the predictors gain over
``topk`` and how much lower their KL is.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

import tokensparse
from tokensparse.data import ImageNetFolder, image_dataset, load_rgb, model_transform
from tokensparse.measure import fidelity
from tokensparse.methods.dynamicvit import describe
from tokensparse.models import create_model
from tokensparse.train.calibrate import IMITATION_TARGETS, CalibrateConfig, calibrate_dynamicvit

ROOT = Path(os.environ.get("TOKENSPARSE_SHARED") or Path(__file__).resolve().parents[2] / "shared")
MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
OTHER = {"even": "odd", "odd": "even"}


def logits_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model.eval()(images[i:i + 125]) for i in range(0, len(images), 125)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=ROOT / "weights" / f"{MODEL}.safetensors")
    p.add_argument("--images", type=Path, default=ROOT / "data" / "imagenet-sample" / "images")
    p.add_argument("--wnids", type=Path, default=ROOT / "data" / "imagenet-sample" / "wnids.txt")
    p.add_argument("--fold", action="append", choices=("even", "odd"),
                   help="positions to calibrate on (repeatable; default: both folds)")
    p.add_argument("--rho", type=float, default=0.7)
    d = CalibrateConfig()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--views", type=int, default=d.views)
    p.add_argument("--holdout", type=float, default=d.holdout)
    p.add_argument("--imitation-epochs", type=int, default=d.imitation_epochs)
    p.add_argument("--imitation-target", choices=IMITATION_TARGETS, default=d.imitation_target)
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="write the last fold's predictors here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = CalibrateConfig(epochs=args.epochs, lr=args.lr, flip=not args.no_flip, views=args.views,
                          holdout=args.holdout, imitation_epochs=args.imitation_epochs,
                          imitation_target=args.imitation_target)
    base = create_model(MODEL, weights=args.weights).eval()
    samples = ImageNetFolder(args.images, args.wnids).samples
    transform = model_transform(base)
    print(f"ViT-Tiny (shared weights), dynamicvit:rho={args.rho}; {cfg}")
    for fold in args.fold or ["even", "odd"]:
        calib = image_dataset(args.images, base, training=False, split=fold, labelled=False)  # labels unused
        student = copy.deepcopy(base)
        t0 = time.perf_counter()
        calibrate_dynamicvit(student, calib, f"dynamicvit:rho={args.rho}", cfg, out=args.out, progress=False)
        seconds = time.perf_counter() - t0
        tokens = describe(student)["tokens"]
        held = samples[1::2] if fold == "even" else samples[0::2]
        images = torch.stack([transform(load_rgb(path)) for path, _ in held])
        labels = torch.tensor([label for _, label in held])
        topk = f"topk:tokens=[{','.join(map(str, tokens))}]"
        reference = logits_of(base, images)
        rows = {"none": reference, f"dynamicvit:rho={args.rho} (calibrated)": logits_of(student, images),
                topk: logits_of(tokensparse.patch(copy.deepcopy(base), topk), images)}
        print(f"\nfold: calibrated on the {len(calib)} {fold}-position images in {seconds:.1f} s "
              f"({seconds / 60:.1f} min, {args.threads} threads); evaluated on the {len(held)} "
              f"{OTHER[fold]}-position images; tokens kept per location {tokens}")
        print(f"{'method':42s} {'top-1':>7s} {'agree':>7s} {'mean KL':>8s}")
        results = {}
        for name, logits in rows.items():
            agreement, kl = fidelity(logits, reference)
            top1 = 100.0 * (logits.argmax(-1) == labels).float().mean().item()
            results[name] = (agreement, kl)
            print(f"{name:42s} {top1:7.1f} {agreement:7.1f} {kl:8.4f}")
        (a_dv, kl_dv), (a_tk, kl_tk) = results[f"dynamicvit:rho={args.rho} (calibrated)"], results[topk]
        print(f"calibrated vs {topk}: agreement {a_dv - a_tk:+.1f} points, mean KL {100 * (kl_dv / kl_tk - 1):+.1f}%")


if __name__ == "__main__":
    main()

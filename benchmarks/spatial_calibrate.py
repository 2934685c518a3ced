"""Calibrate DynamicViT's predictors and fast paths for a ConvNeXt or Swin on half the shared images.

    python benchmarks/spatial_calibrate.py --model convnext_tiny [--weights FILE] [--rho 0.7] [--epochs 3]

Sorted image list: even positions calibrate (labels unused), odd positions evaluate. No
pretrained ConvNeXt or Swin weights can be had on this project's machines, so without
``--weights`` the model keeps timm's random initialisation (seed 0), with ConvNeXt's layer
scale set to 1 (``--layer-scale``): timm initialises it at 1e-6, which makes every block of a
random ConvNeXt a near no-op and any reduction trivially exact. Prints the calibration time
and, on the held-out images, how far the reduced model is from the unreduced one before and
after calibration: top-1 agreement, KL(unreduced || reduced) of the class distributions, and
the relative error of the final feature map.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import tokensparse
from tokensparse.data import image_dataset
from tokensparse.families import get_family
from tokensparse.models import create_model
from tokensparse.train import CalibrateConfig, calibrate_dynamicvit

ROOT = Path(os.environ.get("TOKENSPARSE_SHARED") or Path(__file__).resolve().parents[2] / "shared")


@torch.no_grad()
def distance(reduced: torch.nn.Module, base: torch.nn.Module, data, batch_size: int = 25) -> dict[str, float]:
    """Agreement (%), mean KL and relative feature-map error of ``reduced`` against ``base``."""
    tokens = get_family(base).feature_tokens
    agree = kl = err = n = 0.0
    for images, _ in DataLoader(data, batch_size=batch_size):
        fb, fr = base.forward_features(images), reduced.forward_features(images)
        lb, lr = base.forward_head(fb), reduced.forward_head(fr)
        agree += (lb.argmax(-1) == lr.argmax(-1)).sum().item()
        kl += F.kl_div(lr.log_softmax(-1), lb.log_softmax(-1), log_target=True, reduction="sum").item()
        tb, tr = tokens(fb), tokens(fr)
        err += ((tr - tb).norm(dim=-1) / tb.norm(dim=-1)).mean(dim=1).sum().item()
        n += len(images)
    return {"agreement": 100 * agree / n, "kl": kl / n, "feature_error": err / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnext_tiny")
    p.add_argument("--weights", type=Path, help="pretrained weights (default: random initialisation)")
    p.add_argument("--layer-scale", type=float, default=1.0, help="ConvNeXt layer scale without --weights")
    p.add_argument("--images", type=Path, default=ROOT / "data" / "imagenet-sample" / "images")
    p.add_argument("--wnids", type=Path, default=ROOT / "data" / "imagenet-sample" / "wnids.txt")
    p.add_argument("--rho", type=float, default=0.7)
    p.add_argument("--epochs", type=int, default=CalibrateConfig.epochs)
    p.add_argument("--lr", type=float, default=CalibrateConfig.lr)
    p.add_argument("--views", type=int, default=CalibrateConfig.views)
    p.add_argument("--holdout", type=float, default=CalibrateConfig.holdout)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kwargs = {"ls_init_value": args.layer_scale} if args.weights is None and "convnext" in args.model else {}
    base = create_model(args.model, weights=args.weights, **kwargs)
    calib = image_dataset(args.images, base, training=False, split="even", labelled=False)
    held_out = image_dataset(args.images, base, args.wnids, training=False, split="odd")
    spec = f"dynamicvit:rho={args.rho}"
    untrained = tokensparse.patch(copy.deepcopy(base), spec).eval()
    student = copy.deepcopy(base)
    cfg = CalibrateConfig(epochs=args.epochs, lr=args.lr, views=args.views, holdout=args.holdout)
    t0 = time.perf_counter()
    calibrate_dynamicvit(student, calib, spec, cfg, out=args.out)
    seconds = time.perf_counter() - t0
    weights = f"weights {args.weights}" if args.weights else \
        "random weights" + (f" (layer scale {args.layer_scale})" if kwargs else "")
    print(f"{args.model}, {weights}, {spec}: calibrated on {len(calib)} unlabelled images "
          f"(each + its mirror image + {cfg.views} random views; {cfg.holdout:.0%} held out for early stopping), "
          f"{cfg.epochs} epochs, in {seconds:.0f} s ({seconds / 60:.1f} min) with {args.threads} threads")
    print(f"held out: {len(held_out)} images; distance to the unreduced model")
    print(f"{'':34s} {'agree %':>8s} {'KL':>8s} {'feat err':>9s}")
    for name, model in (("random predictors and fast paths", untrained), ("calibrated", student)):
        d = distance(model.eval(), base, held_out)
        print(f"{name:34s} {d['agreement']:8.1f} {d['kl']:8.4f} {d['feature_error']:9.4f}")


if __name__ == "__main__":
    main()

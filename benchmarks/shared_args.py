"""What the benchmarks on the shared data have in common: where it is, the model its weights are
for, and the options naming them (imported by the scripts in this folder, run as scripts)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from tokensparse.models import create_model
from tokensparse.tune import load_images

ROOT = Path(os.environ.get("TOKENSPARSE_SHARED") or Path(__file__).resolve().parents[2] / "shared")
MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def add_shared_args(p: argparse.ArgumentParser) -> None:
    """--weights, --images, --wnids (the shared data by default) and --threads."""
    p.add_argument("--weights", type=Path, default=ROOT / "weights" / f"{MODEL}.safetensors")
    p.add_argument("--images", type=Path, default=ROOT / "data" / "imagenet-sample" / "images")
    p.add_argument("--wnids", type=Path, default=ROOT / "data" / "imagenet-sample" / "wnids.txt")
    p.add_argument("--threads", type=int, default=2)


def logits_of(model: torch.nn.Module, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """The model's logits on ``images``, in batches, as float32."""
    with torch.inference_mode():
        return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)]).float()


def shared_run(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ViT-Tiny with the shared weights (eval), the shared images in ``tune``'s order, their labels and the
    unreduced logits, with ``--threads`` applied."""
    torch.set_num_threads(args.threads)
    model = create_model(MODEL, weights=args.weights).eval()
    images, labels = load_images(args.images, model, args.wnids, None)
    return model, images, labels, logits_of(model, images)

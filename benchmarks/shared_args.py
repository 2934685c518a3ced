"""What the benchmarks on the shared data have in common: where it is, the model its weights are
for, and the options naming them (imported by the scripts in this folder, run as scripts)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(os.environ.get("TOKENSPARSE_SHARED") or Path(__file__).resolve().parents[2] / "shared")
MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def add_shared_args(p: argparse.ArgumentParser) -> None:
    """--weights, --images, --wnids (the shared data by default) and --threads."""
    p.add_argument("--weights", type=Path, default=ROOT / "weights" / f"{MODEL}.safetensors")
    p.add_argument("--images", type=Path, default=ROOT / "data" / "imagenet-sample" / "images")
    p.add_argument("--wnids", type=Path, default=ROOT / "data" / "imagenet-sample" / "wnids.txt")
    p.add_argument("--threads", type=int, default=2)

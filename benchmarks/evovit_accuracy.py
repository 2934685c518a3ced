"""Training-free accuracy of Evo-ViT on ViT-Tiny (shared weights, 500 shared images).

Prints top-1, top-5 and agreement with the unreduced model (%) for ``update`` in
(representative, carry) and ``keep_rate`` in (0.5, 0.7), at the default stages
([3, 6, 9] for 12 blocks) and at the authors' DeiT stages ([4, 8]), then the authors' whole DeiT
setting (``tokensparse.methods.evovit.AUTHORS_DEIT``), all in one pass over the images (each
image decoded once).

Usage::

    python benchmarks/evovit_accuracy.py [--shared DIR] [--limit N] [--split block]
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

import tokensparse
from tokensparse.measure.accuracy import evaluate_many
from tokensparse.methods.evovit import AUTHORS_DEIT
from tokensparse.models import create_model

MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def specs(split: str) -> list[str]:
    """Default stages first, then the authors' DeiT stages."""
    out = []
    for stages in ("", ",stages=[4,8]"):
        for keep in (0.5, 0.7):
            for update in ("representative", "carry"):
                extra = "" if split == "stage" else f",split={split}"
                out.append(f"evovit:keep_rate={keep},update={update}{stages}{extra}")
    return [*out, AUTHORS_DEIT]


def main() -> None:
    default_shared = os.environ.get("TOKENSPARSE_SHARED", Path(__file__).resolve().parents[2] / "shared")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(default_shared),
                        help="shared data folder (default: $TOKENSPARSE_SHARED or ../shared)")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--split", choices=("stage", "block"), default="stage", help="evovit split option")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = create_model(MODEL, weights=args.shared / "weights" / f"{MODEL}.safetensors")
    models = {"none": base}
    for spec in specs(args.split):
        models[spec] = tokensparse.patch(copy.deepcopy(base), spec)
    data = args.shared / "data" / "imagenet-sample"
    start = time.perf_counter()
    results = evaluate_many(models, data / "images", data / "wnids.txt", reference_key="none",
                            batch_size=args.batch_size, limit=args.limit, progress=False)
    print(f"{MODEL}: {results['none']['n']} images, {time.perf_counter() - start:.0f} s")
    print(f"| {'method':<104} | top-1 | top-5 | agree |")
    print(f"|{'-' * 106}|------:|------:|------:|")
    for name, r in results.items():
        agree = "-" if name == "none" else f"{r['agreement']:.1f}"
        print(f"| {name:<104} | {r['top1']:5.1f} | {r['top5']:5.1f} | {agree:>5} |")


if __name__ == "__main__":
    main()

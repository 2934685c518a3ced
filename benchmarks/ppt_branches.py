"""PPT on real images: top-1 vs unreduced, agreement, and the share of images that pooled per location.

Runs the unreduced and the PPT-patched model once over the images (the library's
``ImageNetFolder`` with the model's timm preprocessing) and reads ``tokensparse.location_records`` after
each batch. Defaults use the shared ViT-Tiny weights and the 500 shared ImageNet images::

    python benchmarks/ppt_branches.py [--spec ppt:threshold=7e-5] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import timm.data
import torch
from torch.utils.data import DataLoader

import tokensparse
from tokensparse.measure import ImageNetFolder
from tokensparse.models import create_model

VIT_TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def shared_root() -> Path:
    """$TOKENSPARSE_SHARED, else the ``shared`` folder beside the repository root."""
    env = os.environ.get("TOKENSPARSE_SHARED")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "shared"


@dataclass
class Tally:
    """Running counts over the images seen so far."""
    n: int = 0
    correct_ref: int = 0
    correct: int = 0
    agree: int = 0
    pooled: dict[int, int] = field(default_factory=dict)  # block -> images that pooled there

    def add(self, ref: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
            infos: list[tokensparse.LocationInfo]) -> None:
        """Count one batch: predictions of both models and the per-location branch choices."""
        self.n += len(target)
        self.correct_ref += int((ref == target).sum())
        self.correct += int((pred == target).sum())
        self.agree += int((pred == ref).sum())
        for loc in infos:
            self.pooled[loc.block] = self.pooled.get(loc.block, 0) + int(loc.extra["pooled"].sum())

    def report(self, spec: str) -> str:
        """The numbers as a few lines of text."""
        pct = lambda k: 100.0 * k / self.n
        lines = [f"images: {self.n}",
                 f"top-1 unreduced: {pct(self.correct_ref):.1f}%",
                 f"top-1 {spec}: {pct(self.correct):.1f}%",
                 f"agreement with unreduced: {pct(self.agree):.1f}%"]
        for block, k in sorted(self.pooled.items()):
            lines.append(f"block {block}: pooled {pct(k):.1f}%, pruned {pct(self.n - k):.1f}%")
        return "\n".join(lines)


def run(model_name: str, weights: Path, images: Path, wnids: Path, spec: str,
        batch_size: int, limit: int | None) -> Tally:
    """One pass of the unreduced and the patched model over the images."""
    base = create_model(model_name, weights=weights)
    reduced = tokensparse.patch(copy.deepcopy(base), spec)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=base))
    dataset = ImageNetFolder(images, wnids, transform=transform)
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    tally = Tally()
    with torch.inference_mode():
        for x, target in DataLoader(dataset, batch_size=batch_size):
            ref = base(x).argmax(dim=-1)
            pred = reduced(x).argmax(dim=-1)
            tally.add(ref, pred, target, tokensparse.location_records(reduced))
    return tally


def main() -> None:
    root = shared_root()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=VIT_TINY)
    p.add_argument("--weights", type=Path, default=root / "weights" / f"{VIT_TINY}.safetensors")
    p.add_argument("--images", type=Path, default=root / "data" / "imagenet-sample" / "images")
    p.add_argument("--wnids", type=Path, default=root / "data" / "imagenet-sample" / "wnids.txt")
    p.add_argument("--spec", default="ppt", help="PPT spec string (default: ppt at its defaults)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tally = run(args.model, args.weights, args.images, args.wnids, args.spec, args.batch_size, args.limit)
    print(f"{args.model} | {args.spec}")
    print(tally.report(args.spec))


if __name__ == "__main__":
    main()

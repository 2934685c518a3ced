"""Fidelity and predicted speed of hand-written schedules on both halves of the shared images.

    python benchmarks/schedule_fidelity.py SPEC [SPEC ...] [--threads 2] [--batch-size 64]

For each spec (any training-free method, e.g. ``ppt:locations=[3,6,9],r=[53,53,53]``):
the speed-up ``tokensparse tune``'s cost model predicts (block timings on this machine, at
``--batch-size``), the GMACs, and agreement / mean KL(unreduced || reduced) on the even and on the
odd positions of the shared images (ViT-Tiny, shared weights). Used to check what the tune
search can and cannot reach, e.g. whether any ppt schedule beats ppt's default at its speed on
both halves. Predicted speed-ups are comparable within one run only (they are scaled to this
run's timing of the unreduced model).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from tokensparse.api import patch, unpatch
from tokensparse.families import get_family
from tokensparse.measure import fidelity
from tokensparse.models import create_model
from tokensparse.spec import parse_spec
from tokensparse.tune import Evaluator, batches, load_images, make_setup, probe

ROOT = Path(os.environ.get("TOKENSPARSE_SHARED") or Path(__file__).resolve().parents[2] / "shared")
MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", nargs="+")
    p.add_argument("--weights", type=Path, default=ROOT / "weights" / f"{MODEL}.safetensors")
    p.add_argument("--images", type=Path, default=ROOT / "data" / "imagenet-sample" / "images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model(MODEL, weights=args.weights).eval()
    family = get_family(model)
    methods = sorted({parse_spec(s)[0] for s in args.specs})
    cpu = torch.device("cpu")
    setup = make_setup(model, family, args.images, None, None, 10 ** 6, methods, "speedup", 1.5, args.batch_size,
                   args.threads, cpu, "fp32", 6, False)
    images, _ = load_images(args.images, model, None, None)
    evaluator = Evaluator(model, family, batches(images, 100), cpu, torch.float32)
    reference = evaluator.logits()
    print(f"{'spec':58s} {'pred.':>6s} {'GMACs':>6s} | {'even KL':>7s} {'agree':>5s} | {'odd KL':>7s} {'agree':>5s}")
    for spec in args.specs:
        patch(model, spec)
        schedule = probe(model, family, setup.size)
        speedup = setup.cost.speedup(schedule, parse_spec(spec)[0])
        logits = evaluator.logits()
        unpatch(model)
        (even_agree, even_kl), (odd_agree, odd_kl) = (fidelity(logits[h::2], reference[h::2]) for h in (0, 1))
        print(f"{spec:58s} {speedup:5.3f}x {schedule.gmacs:6.3f} | {even_kl:7.4f} {even_agree:5.1f} "
              f"| {odd_kl:7.4f} {odd_agree:5.1f}", flush=True)


if __name__ == "__main__":
    main()

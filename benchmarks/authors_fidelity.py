"""A method against its authors' code: the same top-1 on the shared images?

    python benchmarks/authors_fidelity.py SPEC=LOGITS [SPEC=LOGITS ...] [--threads 2]

Each ``LOGITS`` file is a ``torch.save``d ``(500, 1000)`` tensor of the authors' model (their code
patching timm's ViT-Tiny with the shared weights loaded) on the shared images in
``tokensparse.tune``'s order, preprocessed by timm's data config for the weights, made in a
scratch folder outside this repository (their code is not part of tokensparse; each result file,
``benchmarks/results/{mctf,pitome,diffrate}_fidelity.txt``, says how). For each spec: the share of
images on which ``tokensparse`` predicts the same class, top-1 of both against the labels, the
largest logit difference, how many images differ by more than 1e-3 in some logit (a near-tie in a
sort going the other way), and GMACs.
"""
from __future__ import annotations

import argparse

import torch
from shared_args import MODEL, add_shared_args  # this folder: run as a script

from tokensparse.api import patch, unpatch
from tokensparse.measure import gmacs
from tokensparse.models import create_model
from tokensparse.tune import load_images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pairs", nargs="+", help="SPEC=LOGITS (SPEC 'none': the unreduced model)")
    add_shared_args(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model(MODEL, weights=args.weights).eval()
    images, labels = load_images(args.images, model, args.wnids, None)
    print(f"{len(images)} images; {'spec':44s} {'GMACs':>6s} {'same top-1':>10s} {'top-1 ours':>10s} "
          f"{'top-1 theirs':>12s} {'max |dlogit|':>12s} {'images > 1e-3':>13s}")
    for pair in args.pairs:
        spec, _, path = pair.rpartition("=")
        theirs = torch.load(path)
        if spec != "none":
            patch(model, spec)
        with torch.inference_mode():
            ours = torch.cat([model(images[i:i + 50]) for i in range(0, len(images), 50)])
        macs = gmacs(model)
        if spec != "none":
            unpatch(model)
        same = (ours.argmax(1) == theirs.argmax(1)).float().mean().item() * 100
        top1 = [(t.argmax(1) == labels).float().mean().item() * 100 for t in (ours, theirs)]
        diff = (ours - theirs).abs().amax(dim=1)
        print(f"{spec:58s} {macs:6.3f} {same:9.1f}% {top1[0]:9.1f}% {top1[1]:11.1f}% "
              f"{diff.max().item():12.2e} {int((diff > 1e-3).sum()):13d}", flush=True)


if __name__ == "__main__":
    main()

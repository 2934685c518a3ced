"""Top-1, agreement and mean KL to the unreduced model of any specs on the shared images, with GMACs.

    python benchmarks/fidelity_table.py SPEC [SPEC ...] [--threads 2]

ViT-Tiny with the shared weights on the 500 shared images: for each spec (any training-free
method, or ``none``) the GMACs, and top-1 / agreement / mean KL(unreduced || reduced) on all
images, on the even positions and on the odd ones (``tokensparse tune`` searches on the even
positions and holds out the odd ones, so a spec chosen by tune is judged on the odd column).
On 250 images one image is 0.4 points of top-1 or agreement.
"""
from __future__ import annotations

import argparse

from shared_args import add_shared_args, logits_of, shared_run  # this folder: run as a script

from tokensparse.api import patch, unpatch
from tokensparse.measure import fidelity, gmacs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", nargs="+")
    add_shared_args(p)
    args = p.parse_args()
    model, images, labels, reference = shared_run(args)
    parts = {"all": slice(None), "even": slice(0, None, 2), "odd": slice(1, None, 2)}
    head = " | ".join(f"{k:>5s} top-1 agree     KL" for k in parts)
    print(f"{len(images)} images\n{'spec':62s} {'GMACs':>6s} | {head}")
    for spec in args.specs:
        if spec != "none":
            patch(model, spec)
        logits, macs = logits_of(model, images), gmacs(model)
        if spec != "none":
            unpatch(model)
        cells = []
        for part in parts.values():
            agree, kl = fidelity(logits[part], reference[part])
            top1 = (logits[part].argmax(1) == labels[part]).float().mean().item() * 100
            cells.append(f"{top1:11.1f} {agree:5.1f} {kl:6.4f}")
        print(f"{spec:62s} {macs:6.3f} | {' | '.join(cells)}", flush=True)


if __name__ == "__main__":
    main()

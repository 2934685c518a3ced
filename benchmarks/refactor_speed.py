"""Speed before and after a code change, timed interleaved in one process.

Exports the package as it was at ``--before REV`` (``git archive``) under the name
``tokensparse_before``, patches one copy of the model with the old code and one with the
current code for each method, and times every copy and the unreduced model round-robin with
:func:`tokensparse.measure.compare_throughput`. Prints each method's speed-up over the
unreduced model with the old and the new code, and their ratio (new / old).

    python benchmarks/refactor_speed.py --before f0b9bf1 --method tome:r=13 --method ppt
"""
from __future__ import annotations

import argparse
import copy
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import timm
import torch

import tokensparse
from tokensparse.measure import compare_throughput

ROOT = Path(__file__).resolve().parents[1]


def old_package(rev: str, into: Path):
    """The ``tokensparse`` package at ``rev``, importable as ``tokensparse_before``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "tokensparse"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "tokensparse").rename(into / "tokensparse_before")
    sys.path.insert(0, str(into))
    return importlib.import_module("tokensparse_before")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="git revision of the old code")
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--method", action="append", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = old_package(args.before, Path(tmp))
        torch.manual_seed(0)
        base = timm.create_model(args.model).eval()
        models = {"none": base}
        for spec in args.method:
            models[f"{spec} (before)"] = old.patch(copy.deepcopy(base), spec)
            models[f"{spec} (after)"] = tokensparse.patch(copy.deepcopy(base), spec)
        speed = compare_throughput(models, batch_size=args.batch_size, threads=args.threads, runs=args.runs)
    print(f"{args.model}, batch {args.batch_size}, {args.threads} threads, median of {args.runs} interleaved runs; "
          f"before = {args.before}")
    print(f"{'method':<24} {'before':>8} {'after':>8} {'after/before':>13}")
    for spec in args.method:
        b, a = speed[f"{spec} (before)"] / speed["none"], speed[f"{spec} (after)"] / speed["none"]
        print(f"{spec:<24} {b:>7.3f}x {a:>7.3f}x {a / b:>13.3f}")


if __name__ == "__main__":
    main()

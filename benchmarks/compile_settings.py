"""Compiled and eager speed-ups of reduced DeiT-S models under three inductor settings, one process.

    python benchmarks/compile_settings.py [--method SPEC ...] [--runs 15] [--threads 2] [--batch-size 32]

Every model (unreduced and each ``--method``) is timed eager and compiled (``fullgraph=True``,
inductor) with: ``freeze`` (freezing with MKL weight pre-packing: what ``tokensparse bench
--compile`` uses on a CPU), ``freeze-noprepack`` (freezing, ``cpp.weight_prepack=False``) and
``nofreeze`` (inductor's defaults), all interleaved in one run (``tokensparse.measure.timed_runs``).
Prints each setting's median ms per batch and each method's speed-up over the unreduced model
compiled the same way, so one can see whether a setting favours reduced or unreduced graphs.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
import torch._inductor.config as inductor_config

import tokensparse
from tokensparse.measure import timed_runs

SETTINGS = {"freeze": {"freezing": True},
            "freeze-noprepack": {"freezing": True, "cpp.weight_prepack": False},
            "nofreeze": {}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--method", action="append", help="spec (repeatable; default tome:r=13)")
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # every compiled copy shares the models' forward code
    base = timm.create_model(args.model).eval()
    eager = {"none": base}
    for spec in args.method or ["tome:r=13"]:
        eager[spec] = tokensparse.patch(copy.deepcopy(base), spec).eval()
    x = torch.randn(args.batch_size, 3, 224, 224)
    variants = {f"eager|{name}": m for name, m in eager.items()}
    for name, m in eager.items():
        for setting, options in SETTINGS.items():
            compiled = torch.compile(copy.deepcopy(m), fullgraph=True, dynamic=False)
            start = time.perf_counter()
            with inductor_config.patch(options), torch.inference_mode():
                compiled(x)
            print(f"compiled {name} ({setting}) in {time.perf_counter() - start:.1f} s", flush=True)
            variants[f"{setting}|{name}"] = compiled
    times = timed_runs(variants, batch_size=args.batch_size, input_size=(3, 224, 224), threads=args.threads,
                       warmup=1, runs=args.runs)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.model}, batch {args.batch_size}, {args.threads} threads, median of {args.runs} interleaved runs")
    print(f"{'setting':18s} {'model':22s} {'ms/batch':>9s} {'speed-up':>9s} {'vs eager':>9s}")
    for key, seconds in median.items():
        setting, name = key.split("|", 1)
        speedup = median[f"{setting}|none"] / seconds
        eager_speedup = median["eager|none"] / median[f"eager|{name}"]
        print(f"{setting:18s} {name:22s} {seconds * 1e3:9.1f} {speedup:8.3f}x {speedup - eager_speedup:+9.3f}")


if __name__ == "__main__":
    main()

"""Speed-up of token reduction on a transformers ViT against the same methods on timm, one process.

A ViT-S-sized ``ViTForImageClassification`` (random weights: the same speed as trained ones;
SDPA attention) and timm's ``deit_small_patch16_224`` are each timed unreduced and with every
``--method``, all round-robin in one call of :func:`tokensparse.measure.timed_runs` (the
function ``tokensparse bench`` times with), so all models see the same machine state. Each
method's speed-up is over its own library's unreduced model; the last column is the
transformers speed-up as a share of the timm one (the issue's target: >= 95%).

    python benchmarks/hf_speed.py --method tome:r=13 --method evit:keep_rate=0.7
"""
from __future__ import annotations

import argparse
import copy
import statistics

import timm
import torch
import transformers

import tokensparse
from tokensparse.measure import speedup_range, timed_runs


def vit_small() -> transformers.ViTForImageClassification:
    """``deit_small_patch16_224``'s shape as a transformers ViT classifier (SDPA attention)."""
    config = transformers.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                    intermediate_size=1536, image_size=224, patch_size=16, num_labels=1000,
                                    attn_implementation="sdpa")
    return transformers.ViTForImageClassification(config).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", action="append", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    bases = {"timm": timm.create_model("deit_small_patch16_224").eval(), "transformers": vit_small()}
    models = {}
    for lib, base in bases.items():
        models[f"{lib} none"] = base
        for spec in args.method:
            models[f"{lib} {spec}"] = tokensparse.patch(copy.deepcopy(base), spec)
    times = timed_runs(models, batch_size=args.batch_size, threads=args.threads, runs=args.runs, warmup=args.warmup)
    print(f"ViT-S/16 224, batch {args.batch_size}, fp32, {args.threads} threads, median of {args.runs} runs, "
          f"all {len(models)} models interleaved in one process; unreduced transformers attention: "
          f"{bases['transformers'].config._attn_implementation}")
    print(f"{'method':<22} {'timm img/s':>10} {'speed-up':>9} {'hf img/s':>9} {'speed-up':>9} {'hf/timm':>8}")

    def rate(name: str) -> float:
        return args.batch_size / statistics.median(times[name])

    def speedup(lib: str, spec: str) -> float:
        return statistics.median(times[f"{lib} none"]) / statistics.median(times[f"{lib} {spec}"])

    print(f"{'none':<22} {rate('timm none'):>10.1f} {1:>8.2f}x {rate('transformers none'):>9.1f} {1:>8.2f}x")
    for spec in args.method:
        st, sh = speedup("timm", spec), speedup("transformers", spec)
        lo, hi = speedup_range(times, "transformers none", f"transformers {spec}")
        print(f"{spec:<22} {rate(f'timm {spec}'):>10.1f} {st:>8.2f}x {rate(f'transformers {spec}'):>9.1f} "
              f"{sh:>8.2f}x {sh / st:>7.1%}   (hf range {lo:.2f}-{hi:.2f})")


if __name__ == "__main__":
    main()

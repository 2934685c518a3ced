"""Overhead-free limit of a configuration (METHODS.md, "Measuring").

Runs the patched model once to read how many tokens each block's attention and MLP see,
then times the *plain* timm blocks on sequences already cut to those counts, next to the
unpatched model and the patched model, interleaved in one process. The patched model's
speed-up should come within a few percent of the limit's: the ``overhead`` column is how much
longer the patched model takes than its limit (its reduction work, scoring included), to compare
methods at the same token counts. Methods whose token counts are the same share one limit (timed
once), so their overheads have the same denominator.

    python benchmarks/overhead_limit.py --method tome:r=13 --method evit:keep_rate=0.7
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import timm
import torch
from torch import nn

import tokensparse


def token_counts(model: nn.Module, x: torch.Tensor) -> list[tuple[int, int]]:
    """(tokens into attention, tokens into MLP) per block of a patched model."""
    with torch.inference_mode():
        model(x[:1])
    after = {l.block: l.num_tokens for l in tokensparse.location_records(model)}
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    counts = []
    for i in range(len(model.blocks)):
        n_out = after.get(i, n)
        counts.append((n, n_out))
        n = n_out
    return counts


class CutBlocks(nn.Module):
    """The unpatched model's blocks run on sequences truncated to given counts (no scoring)."""

    def __init__(self, model: nn.Module, counts: list[tuple[int, int]]) -> None:
        super().__init__()
        self.model, self.counts = model, counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        for blk, (n_in, n_out) in zip(m.blocks, self.counts):
            x = x[:, :n_in]
            x = x + blk.ls1(blk.attn(blk.norm1(x)))
            x = x[:, :n_out]
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        return m.forward_head(m.norm(x))


def arguments(doc: str | None, runs: int) -> argparse.Namespace:
    """The options both timing scripts take (model, methods, batch size, threads, rounds)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--method", action="append", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=runs)
    return p.parse_args()


def add_with_limits(models: dict[str, nn.Module], base: nn.Module, specs: list[str], x: torch.Tensor,
                    prepare: Callable[[nn.Module], None] | None = None) -> dict[str, str]:
    """Add a patched copy of ``base`` per spec to ``models`` (``prepare`` applied after its token counts are
    read) and, per distinct token counts, their overhead-free limit; returns each spec's limit's key."""
    limit_of: dict[str, str] = {}
    by_counts: dict[tuple[tuple[int, int], ...], str] = {}
    for spec in specs:
        patched = tokensparse.patch(copy.deepcopy(base), spec)
        counts = tuple(token_counts(patched, x))
        if prepare is not None:
            prepare(patched)
        models[spec] = patched
        if counts not in by_counts:
            by_counts[counts] = f"{spec} (limit)"
            models[by_counts[counts]] = CutBlocks(base, list(counts))
        limit_of[spec] = by_counts[counts]
    return limit_of


def main() -> None:
    args = arguments(__doc__, runs=7)
    torch.set_num_threads(args.threads)
    base = timm.create_model(args.model).eval()
    x = torch.randn(args.batch_size, 3, *base.patch_embed.img_size)
    models: dict[str, nn.Module] = {"none": base}
    limit_of = add_with_limits(models, base, args.method, x)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(x)
        for _ in range(args.runs):
            for k, m in models.items():
                t = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model}, batch {args.batch_size}, {args.threads} threads, median of {args.runs} interleaved runs")
    print(f"{'':32s} {'img/s':>8s}  {'speed-up':>8s}  overhead")
    for k, t in med.items():
        limit = med[limit_of[k]] if k in limit_of else None
        over = "" if limit is None else f"{100 * (t / limit - 1):+7.1f}%"
        print(f"{k:32s} {args.batch_size / t:8.1f}  {med['none'] / t:7.2f}x  {over}")


if __name__ == "__main__":
    main()

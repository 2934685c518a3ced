"""A method's reduction work, timed where it runs: each method against ToMe at the same token counts.

``overhead_limit.py`` compares whole forward passes, whose time is nearly all the same matrix products
(QKV, projections, MLP); on a shared machine their jitter (several percent between runs) hides a
difference of a millisecond or two in the reduction. This script times only what a method changes,
inside the patched model's own forward pass on the same input:

- ``attention``: each block's attention core (the fused kernel, with the proportional-attention bias
  when the method has sizes, or the explicit per-head softmax a method that needs probabilities runs);
- ``by-products``: what the attention returns for the method (keys averaged over heads, class-attention
  rows, ...);
- ``reduction``: the method's hooks (scoring, choosing, merging or pruning, the token-state update);
- ``graph score`` (part of ``reduction``): the score a method computes over the whole token graph,
  which ToMe's bipartite matching does not: PiToMe's energy (the ``n x n`` cosine similarities and an
  exponential per pair), Zero-TPrune's weighted PageRank (its iterations over every head's attention);

next to the attention core of the overhead-free limit (the unpatched blocks on sequences cut to the
same counts: fused attention, no bias). ``work`` is the method's three parts less the limit's
attention: the time its reduction adds to a forward pass. Models are timed interleaved, one forward pass
each per round; each part is the median over rounds of its total in one pass (ms per batch).

    python benchmarks/reduction_work.py --method tome:r=13 --method pitome:r=13 --method zerotprune:r=13
"""
from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import timm
import torch
from overhead_limit import add_with_limits, arguments  # this folder: run as a script
from torch import nn

import tokensparse.families.vit as vit_family
from tokensparse.families.base import block_hook
from tokensparse.methods import pitome, zerotprune

PARTS = ("attention", "by-products", "reduction", "graph score")
WORK = PARTS[:3]
"""The parts of ``work``; ``graph score`` is counted inside ``reduction``."""


class Clock:
    """Totals per part of the time spent in the wrapped calls, reset per forward pass."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = dict.fromkeys(PARTS, 0.0)

    def timed(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.total[part] += time.perf_counter() - t
            return out
        return run


@contextlib.contextmanager
def instrumented(clock: Clock) -> Iterator[None]:
    """Time the attention core and by-products of every (patched or plain) timm attention, and the
    graph scores of PiToMe and Zero-TPrune."""
    saved = (torch.nn.functional.scaled_dot_product_attention, vit_family.attention_by_head,
             vit_family.attention_extras, pitome.unit_energy, zerotprune.weighted_pagerank)
    torch.nn.functional.scaled_dot_product_attention = clock.timed("attention", saved[0])
    vit_family.attention_by_head = clock.timed("attention", saved[1])
    vit_family.attention_extras = clock.timed("by-products", saved[2])
    pitome.unit_energy = clock.timed("graph score", saved[3])
    zerotprune.weighted_pagerank = clock.timed("graph score", saved[4])
    try:
        yield
    finally:
        (torch.nn.functional.scaled_dot_product_attention, vit_family.attention_by_head,
         vit_family.attention_extras, pitome.unit_energy, zerotprune.weighted_pagerank) = saved


def time_hooks(model: nn.Module, clock: Clock) -> None:
    """Wrap the hooks of a patched model's blocks so that their time counts as ``reduction``."""
    for blk in model.blocks:
        hook = block_hook(blk)
        if hook is not None:
            for name in ("before", "after_attn", "after"):
                setattr(hook, name, clock.timed("reduction", getattr(hook, name)))


def main() -> None:
    args = arguments(__doc__, runs=21)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = timm.create_model(args.model).eval()
    x = torch.randn(args.batch_size, 3, *base.patch_embed.img_size)
    clock = Clock()
    models: dict[str, nn.Module] = {}
    limit_of = add_with_limits(models, base, args.method, x, prepare=lambda m: time_hooks(m, clock))
    parts: dict[str, dict[str, list[float]]] = {k: {part: [] for part in PARTS} for k in models}
    forward: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode(), instrumented(clock):
        for m in models.values():
            m(x)
        for _ in range(args.runs):
            for k, m in models.items():
                clock.reset()
                t = time.perf_counter()
                m(x)
                forward[k].append(time.perf_counter() - t)
                for part in PARTS:
                    parts[k][part].append(clock.total[part])
    med = {k: {part: 1e3 * statistics.median(v) for part, v in d.items()} for k, d in parts.items()}
    print(f"{args.model}, batch {args.batch_size}, {args.threads} threads, {args.runs} interleaved rounds; "
          "ms per batch (median over rounds)")
    print(f"{'':32s} {'forward':>8s} {'attention':>10s} {'by-products':>11s} {'reduction':>10s} {'work':>8s} "
          f"{'graph score':>12s}")
    for k in models:
        m = med[k]
        work = "" if k not in limit_of else f"{sum(m[p] for p in WORK) - med[limit_of[k]]['attention']:8.1f}"
        print(f"{k:32s} {1e3 * statistics.median(forward[k]):8.1f} {m['attention']:10.1f} {m['by-products']:11.1f} "
              f"{m['reduction']:10.1f} {work:>8s} {m['graph score']:12.1f}")


if __name__ == "__main__":
    main()

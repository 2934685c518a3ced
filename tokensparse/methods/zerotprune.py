"""Zero-TPrune: prune by importance from the attention graph, then by similarity (Wang et al., CVPR 2024).

There is no official code; this follows the paper:

- I-stage: each head's attention probabilities are a graph; the weighted PageRank
  (:func:`~tokensparse.ops.weighted_pagerank`) iterates ``s_j <- sum_i A_ij s_i`` from the uniform
  score: 30 iterations in the first three blocks, 5 in the middle ones, 1 in the last three (the
  paper: 30-50, 5-10 and 1, "to ensure convergence"; we take the cheap end);
- the heads are aggregated by root mean square (emphasizing the informative region), leaving
  out heads whose score variance lies outside ``[0.01, 0.7]`` (the variance-based head filter; the
  paper does not say on what scale the variance is taken: we take it of ``n * s``, the score
  relative to the uniform one, where those bounds separate flat from one-token heads);
- S-stage: the patch tokens, ranked by importance, are split into the more important half and
  the less important half; each token of the less important half is matched to its most similar
  token of the other half (cosine of the keys, averaged over heads), and the ``r`` with the
  highest similarity are pruned;
- the kept tokens are ordered by importance (the ranking the next block starts from).

Pruned tokens are dropped (no merging, so no sizes and no proportional attention). Prefix tokens
take part in the attention graph but are never pruned. The attention graph needs the attention
probabilities, so a reducing block runs its attention on them instead of the fused kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import TokenSparseError
from ..families import AttentionExtras
from ..ops import gather_tokens, head_filtered_importance, pairwise_cosine, weighted_pagerank, with_prefix
from ..state import TokenState
from .base import BlockReducerMethod, CountReducer, TokenReducer, prune_to
from .options import OptionInfo, block_counts, check_count, check_counts, check_number, r_option


def default_iterations(depth: int) -> list[int]:
    """The paper's PageRank iterations per block: 30 in the first three, 1 in the last three, 5 between."""
    return [30 if i < 3 else 1 if i >= depth - 3 else 5 for i in range(depth)]


def zerotprune_keep(importance: Tensor, keys: Tensor, r: int) -> Tensor:
    """Patch positions kept ``(B, n - r)``, by falling importance, after pruning ``r`` of the less important
    half: those most similar (cosine of ``keys`` ``(B, n, D)``) to a token of the more important half."""
    n = importance.shape[1]
    order = importance.argsort(dim=-1, descending=True)
    top, low = order[:, :n - n // 2], order[:, n - n // 2:]
    best = pairwise_cosine(gather_tokens(keys, low), gather_tokens(keys, top)).amax(dim=-1)
    stay = best.argsort(dim=-1, descending=True)[:, r:].sort(dim=-1).values  # positions in `low`, by importance
    return torch.cat([top, low.gather(1, stay)], dim=1)


class ZeroTPruneReducer(CountReducer):
    """Prune ``r`` patch tokens: PageRank importance over the attention graph, then similarity."""
    needs = frozenset({"probs", "keys"})
    settings = ("iterations", "var_min", "var_max")

    def __init__(self, r: int, iterations: int, var_min: float, var_max: float) -> None:
        super().__init__(r)
        self.iterations, self.var_min, self.var_max = iterations, var_min, var_max

    def reduce(self, x: Tensor, extras: AttentionExtras, state: TokenState, r: int) -> Tensor:
        P = state.num_prefix
        scores = torch.stack([weighted_pagerank(p.detach().float(), self.iterations) for p in extras.probs], dim=1)
        scores = scores[:, :, P:]
        importance = head_filtered_importance(scores, self.var_min, self.var_max)
        return prune_to(x, with_prefix(zerotprune_keep(importance, extras.keys[:, P:].detach(), r), P), state)


class ZeroTPrune(BlockReducerMethod):
    name = "zerotprune"
    summary = "Zero-TPrune: PageRank importance on the attention graph, then prune unimportant look-alikes"
    options = (
        r_option(13, "pruned"),
        OptionInfo("iterations", None, "PageRank iterations: an int, or one per block; default 30 in the first "
                                       "three blocks, 1 in the last three, 5 between (the paper's)"),
        OptionInfo("var_min", 0.01, "head filter: heads whose score variance is below this are left out"),
        OptionInfo("var_max", 0.7, "head filter: heads whose score variance is above this are left out"),
    )

    def validate(self) -> None:
        c = self.config
        check_counts(c["r"])
        it = c["iterations"]
        if it is not None:
            for v in (it if isinstance(it, (list, tuple)) else [it]):
                check_count(v, "iterations", minimum=1)
        check_number(c["var_min"], "var_min", 0)
        check_number(c["var_max"], "var_max", 0)
        if c["var_max"] < c["var_min"]:
            raise TokenSparseError(f"var_max ({c['var_max']}) must not be below var_min ({c['var_min']})")

    def build_reducers(self, depth: int) -> dict[int, TokenReducer]:
        c = self.config
        r = c["r"]
        rs = block_counts(r, depth) if isinstance(r, (list, tuple)) else [r] * depth
        it = c["iterations"]
        if it is None:
            its = default_iterations(depth)
        elif isinstance(it, (list, tuple)):
            if len(it) != depth:
                raise TokenSparseError(f"iterations has {len(it)} entries but the model has {depth} blocks")
            its = list(it)
        else:
            its = [it] * depth
        return {i: ZeroTPruneReducer(rs[i], its[i], c["var_min"], c["var_max"]) for i in range(depth) if rs[i] > 0}

"""Top-K and EViT: keep the patch tokens with the highest class attention (METHODS.md §1).

Kept tokens at ``keep_rate``: ``ceil(keep_rate * N)`` of the ``N`` patch tokens, as the EViT
authors' code (``math.ceil(keep_rate * (N - 1))``, the class token excluded).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..families import AttentionExtras
from ..ops import fuse_tokens, gather_tokens, keep_assignment, split_topk, topk_indices, with_prefix
from ..state import TokenState
from .base import BlockReducerMethod, TokenReducer
from .options import (
    LOCATIONS,
    OptionInfo,
    check_bool,
    check_count,
    check_keep_rate,
    keep_count,
    per_location,
    resolve_locations,
)


class TopKReducer(TokenReducer):
    """Keep the ``k`` patch tokens with the highest head-averaged class attention.

    With ``fuse``, the dropped tokens are collapsed into one token ``sum_i a_i x_i`` (raw class
    attention weights, as in the EViT code), appended after the kept tokens.
    """
    needs = frozenset({"cls_attn"})

    def __init__(self, keep_rate: float | None, tokens: int | None, fuse: bool) -> None:
        super().__init__()
        self.keep_rate, self.tokens, self.fuse = keep_rate, tokens, fuse

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, tokens={self.tokens}, fuse={self.fuse}"

    def forward(self, x: Tensor, extras: AttentionExtras, state: TokenState, block: int) -> Tensor:
        P = state.num_prefix
        _B, N, _ = x.shape
        n = N - P
        k = min(self.tokens, n) if self.tokens is not None else keep_count(self.keep_rate, n, "ceil")
        if k >= n:
            state.record(block, x)
            return x
        scores = extras.cls_attn.mean(dim=1)[:, P:]
        size = state.sizes(x)
        if not self.fuse:
            keep = with_prefix(topk_indices(scores, k), P)
            state.update(keep_assignment(keep, N, P), None if state.size is None else gather_tokens(size, keep))
            x = gather_tokens(x, keep)
        else:
            keep, drop = split_topk(scores, k)
            fused = fuse_tokens(gather_tokens(x[:, P:], drop), scores.gather(1, drop))
            fused_size = gather_tokens(size[:, P:], drop).sum(dim=1, keepdim=True)
            keep = with_prefix(keep, P)
            assign = keep_assignment(keep, N, P).scatter(1, drop + P, P + k)
            state.update(assign, torch.cat([gather_tokens(size, keep), fused_size], dim=1))
            x = torch.cat([gather_tokens(x, keep), fused], dim=1)
        state.record(block, x)
        return x


class TopK(BlockReducerMethod):
    name = "topk"
    summary = "Top-K: keep the patch tokens with the highest class attention at a few blocks, drop the rest"
    needs_class_token = True
    options = (
        OptionInfo("keep_rate", 0.7, "share of patch tokens kept at each location, in (0, 1]; or one per location"),
        OptionInfo("tokens", None, "absolute patch tokens kept (one count, or one per location); overrides keep_rate"),
        LOCATIONS,
        OptionInfo("fuse", False, "fuse dropped tokens into one token weighted by class attention (EViT)"),
    )

    def validate(self) -> None:
        c = self.config
        if c["tokens"] is None:
            rates = c["keep_rate"] if isinstance(c["keep_rate"], (list, tuple)) else [c["keep_rate"]]
            for r in rates:
                check_keep_rate(r)
        else:
            counts = c["tokens"] if isinstance(c["tokens"], (list, tuple)) else [c["tokens"]]
            for t in counts:
                check_count(t, "tokens", minimum=1)
        check_bool(c["fuse"], "fuse")

    def build_reducers(self, depth: int) -> dict[int, TokenReducer]:
        c = self.config
        locs = resolve_locations(c["locations"], depth)
        if c["tokens"] is not None:
            counts = per_location(c["tokens"], len(locs), "tokens")
            rates = [None] * len(locs)
        else:
            rates = per_location(c["keep_rate"], len(locs), "keep_rate")
            counts = [None] * len(locs)
        return {l: TopKReducer(r, t, c["fuse"]) for l, r, t in zip(locs, rates, counts)}


class EViT(TopK):
    name = "evit"
    summary = "EViT: keep attentive tokens by class attention and fuse the inattentive ones into one token"
    options = tuple(
        OptionInfo("fuse", True, o.help) if o.name == "fuse" else o for o in TopK.options)

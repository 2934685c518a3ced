"""PPT: per image, pool (merge) tokens when attention is flat, prune them when it is peaked (METHODS.md §3)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..families import AttentionExtras
from ..ops import gather_tokens, keep_assignment, topk_indices, with_prefix
from ..state import TokenState
from .base import BlockReducerMethod, CountReducer, TokenReducer
from .options import (
    LOCATIONS,
    PROP_ATTN,
    OptionInfo,
    check_count,
    check_number,
    per_location,
    r_option,
    resolve_locations,
)
from .tome import merge_patch_tokens

REFERENCE_R = 50
"""Tokens removed per location at the reference resolution (196 patch tokens, DeiT-S at 224)."""
REFERENCE_PATCHES = 196


def default_r(num_patches: int) -> int:
    """PPT's default ``r`` for ``num_patches`` original patch tokens: 50 per 196, rounded."""
    return round(REFERENCE_R * num_patches / REFERENCE_PATCHES)


def ppt_scores(cls_attn: Tensor, value_norm: Tensor, num_prefix: int) -> Tensor:
    """Importance ``(B, n)`` of the patch tokens, summing to 1 per image (fp32).

    Class attention ``(B, H, N)`` summed over heads times the value norm ``(B, N)`` (as in ATS).
    """
    scores = (cls_attn.float().sum(dim=1) * value_norm.float())[:, num_prefix:]
    return scores / scores.sum(dim=-1, keepdim=True)


def choose_pool(scores: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Per image, ``(pooled, variance)``: pool where the score variance is below ``threshold``.

    ``pooled`` is a ``(B,)`` bool tensor (False: prune); ``variance`` the ``(B,)`` unbiased
    variance of ``scores`` ``(B, n)`` (``torch.var``, as in the authors' code).
    """
    variance = scores.var(dim=-1)
    return variance < threshold, variance


def prune_patch_tokens(x: Tensor, scores: Tensor, r: int, state: TokenState) -> Tensor:
    """Drop the ``r`` patch tokens of ``x`` with the lowest ``scores`` ``(B, n)``; keep the order.

    Prefix tokens are kept; updates ``state`` (sizes and patch-to-token map) like
    :func:`~tokensparse.methods.tome.merge_patch_tokens`.
    """
    P = state.num_prefix
    _B, N, _ = x.shape
    keep = with_prefix(topk_indices(scores, N - P - r), P)
    state.update(keep_assignment(keep, N, P), None if state.size is None else gather_tokens(state.size, keep))
    return gather_tokens(x, keep)


def fork_state(state: TokenState, x: Tensor) -> TokenState:
    """A scratch state over the current tokens of ``x``: after one reduction on it, its
    ``patch_to_token`` is that reduction's old-to-new map ``(B, N)`` and its ``size`` the new sizes."""
    scratch = TokenState(num_prefix=state.num_prefix, prop_attn=state.prop_attn)
    scratch.size = state.size
    scratch.patch_to_token = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    return scratch


def select_per_image(pooled: Tensor, x_pool: Tensor, x_prune: Tensor,
                     pool: TokenState, prune: TokenState, state: TokenState) -> Tensor:
    """Take each image from the pooled or the pruned branch; record the chosen maps in ``state``."""
    m2, m3 = pooled.view(-1, 1), pooled.view(-1, 1, 1)
    size = torch.where(m3, pool.sizes(x_pool), prune.sizes(x_prune))
    state.update(torch.where(m2, pool.patch_to_token, prune.patch_to_token), size)
    return torch.where(m3, x_pool, x_prune)


class PPTReducer(CountReducer):
    """Remove ``r`` patch tokens per image, pooling (ToMe merging) or pruning by score variance.

    ``r=None`` uses :func:`default_r` of the input's patch count. Both branches remove exactly
    ``r`` tokens (capped at half the current patch tokens), so the batch stays rectangular.
    Records ``pooled`` (``(B,)`` bool) and the score ``variance`` (``(B,)``) per location.
    Both branches are computed for every batch and each image takes its own with
    ``torch.where``: no data-dependent control flow or host synchronisation, so the reducer
    compiles (``torch.compile(fullgraph=True)``) and exports (ONNX); merging the few tokens
    of the branch an image does not take costs about 1% of the block's time.
    """
    needs = frozenset({"cls_attn", "value_norm", "keys"})

    settings = ("threshold",)

    def __init__(self, r: int | None, threshold: float) -> None:
        super().__init__(r)
        self.threshold = threshold

    def forward(self, x: Tensor, extras: AttentionExtras, state: TokenState, block: int) -> Tensor:
        P = state.num_prefix
        r = default_r(state.patch_to_token.shape[1]) if self.r is None else self.r
        r = min(r, (x.shape[1] - P) // 2)
        scores = ppt_scores(extras.cls_attn.detach(), extras.value_norm.detach(), P)
        pooled, variance = choose_pool(scores, self.threshold)
        if r > 0:
            pool, prune = fork_state(state, x), fork_state(state, x)
            x_pool = merge_patch_tokens(x, extras.keys, r, pool)
            x_prune = prune_patch_tokens(x, scores, r, prune)
            x = select_per_image(pooled, x_pool, x_prune, pool, prune, state)
        state.record(block, x, pooled=pooled, variance=variance)
        return x


class PPT(BlockReducerMethod):
    name = "ppt"
    summary = "PPT: per image, pool (merge) tokens where attention is flat, prune inattentive ones where it is peaked"
    needs_class_token = True
    options = (
        r_option(None, "removed", "; default 50 per 196 patch tokens, scaled with the patch count", per="location"),
        LOCATIONS,
        OptionInfo("threshold", 7e-5, "score variance below which an image pools, above which it prunes"),
        PROP_ATTN,
    )

    def validate(self) -> None:
        c = self.config
        rs = c["r"] if isinstance(c["r"], (list, tuple)) else [c["r"]]
        for r in rs:
            if r is not None:
                check_count(r, "r")
        check_number(c["threshold"], "threshold", 0)
        self.use_prop_attn()

    def build_reducers(self, depth: int) -> dict[int, TokenReducer]:
        c = self.config
        locs = resolve_locations(c["locations"], depth)
        rs = per_location(c["r"], len(locs), "r")
        return {l: PPTReducer(r, float(c["threshold"])) for l, r in zip(locs, rs)}

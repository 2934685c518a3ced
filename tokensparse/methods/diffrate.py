"""DiffRate: prune by class attention, then merge the least important kept tokens (Chen et al., ICCV 2023).

Follows the authors' code at inference (OpenGVLab/DiffRate, commit 91ae3e3:
``DiffRate/patch/deit.py``, ``DiffRateBlock.forward`` in eval mode, and ``DiffRate/merge.py``):

- after the attention residual of each block, the patch tokens are sorted by the class token's
  attention to them (averaged over heads, proportional attention included);
- the first ``prune_kept`` of them stay, the rest are dropped;
- of those, the ones after the first ``merge_kept`` merge into their most similar token among
  the first ``merge_kept`` (cosine similarity of the tokens themselves, prefix tokens excluded
  as targets); a merged token is the plain mean of itself and what merged into it (their
  ``scatter_reduce(mode="mean")``), and the sizes of the merged tokens are scaled by their
  similarity before they add up ("proportional attention considering similarity");
- proportional attention adds ``log(size)`` to the attention logits.

``prune_kept`` and ``merge_kept`` are per-block lists of *patch* tokens kept (the authors'
``compression_rate.json`` counts the class token too: subtract 1); a block past the end of a list
keeps what it has. The default is the authors' learned schedule for DeiT-Tiny at 1.0 GFLOPs
(``compression_rate.json``, ``ViT-T-DeiT``, ``"1.0"``), as shares of the patch tokens and mapped
onto the model's depth. ``tokensparse calibrate --method diffrate --gmacs G`` learns a schedule for
a model (DiffRate's differentiable rates, :mod:`tokensparse.train.diffrate`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import TokenSparseError
from ..families import AttentionExtras
from ..ops import group_assignment, pairwise_cosine, with_prefix
from ..state import TokenState
from .base import BlockReducerMethod, OptionInfo, TokenReducer, check_bool, check_count, merge_patches, prune_to

AUTHORS_TINY_1G = (
    [197, 197, 196, 194, 188, 184, 178, 164, 156, 137, 129, 21],
    [197, 197, 196, 190, 186, 154, 148, 156, 145, 135, 125, 21],
)
"""The authors' DeiT-Tiny schedule at 1.0 GFLOPs (prune, merge), class token counted, 196 patches."""


def default_schedule(depth: int, patches: int) -> tuple[list[int], list[int]]:
    """:data:`AUTHORS_TINY_1G` as patch tokens kept, scaled to ``patches`` and mapped onto ``depth`` blocks."""
    out = []
    for counts in AUTHORS_TINY_1G:
        src = [c - 1 for c in counts]
        picked = [src[round(i * (len(src) - 1) / max(depth - 1, 1))] for i in range(depth)]
        out.append([min(patches, max(1, round(k * patches / 196))) for k in picked])
    return out[0], out[1]


class DiffRateReducer(TokenReducer):
    """Keep ``prune_kept`` patch tokens by class attention, then merge all but ``merge_kept`` of them."""
    needs = frozenset({"cls_attn"})

    def __init__(self, prune_kept: int | None, merge_kept: int | None) -> None:
        super().__init__()
        self.prune_kept, self.merge_kept = prune_kept, merge_kept

    def extra_repr(self) -> str:
        return f"prune_kept={self.prune_kept}, merge_kept={self.merge_kept}"

    def counts(self, n: int) -> tuple[int, int]:
        """Patch tokens left after pruning and after merging, out of ``n``."""
        k1 = n if self.prune_kept is None else min(n, self.prune_kept)
        k2 = k1 if self.merge_kept is None else min(k1, self.merge_kept)
        return k1, max(k2, 1)

    def forward(self, x: Tensor, extras: AttentionExtras, state: TokenState, block: int) -> Tensor:
        P = state.num_prefix
        n = x.shape[1] - P
        k1, k2 = self.counts(n)
        if k2 < n:
            order = extras.cls_attn.mean(dim=1)[:, P:].argsort(dim=-1, descending=True)
            x = prune_to(x, with_prefix(order[:, :k1], P), state)
            if k2 < k1:
                x = merge_unimportant(x, k2, state)
        state.record(block, x)
        return x


def merge_unimportant(x: Tensor, kept: int, state: TokenState) -> Tensor:
    """DiffRate's merge of ``x`` ``(B, P + k, C)``, patch tokens by falling importance: each patch token
    after the first ``kept`` joins its most similar one among them (plain mean, sizes scaled by the similarity)."""
    P = state.num_prefix
    k = x.shape[1] - P
    B = x.shape[0]
    xp = x[:, P:]
    sim_max, dst = pairwise_cosine(xp[:, kept:].detach(), xp[:, :kept].detach()).max(dim=-1)
    dev = x.device
    into = torch.arange(kept, device=dev).expand(B, -1)
    src = torch.arange(kept, k, device=dev).expand(B, -1)
    assign = group_assignment(k, None, into, src, dst)
    size = state.sizes(x)[:, P:]
    scaled = torch.cat([size[:, :kept], size[:, kept:] * sim_max.unsqueeze(-1).to(size.dtype)], dim=1)
    return merge_patches(x, assign, kept, state, weight=torch.ones_like(size), size=scaled)


def _counts(value: Any, name: str, depth: int) -> list[int | None]:
    if not isinstance(value, (list, tuple)):
        raise TokenSparseError(f"{name} must be a list of patch-token counts, one per block, got {value!r}")
    if len(value) > depth:
        raise TokenSparseError(f"{name} has {len(value)} entries but the model has {depth} blocks")
    for v in value:
        check_count(v, name, minimum=1)
    return list(value) + [None] * (depth - len(value))


class DiffRate(BlockReducerMethod):
    name = "diffrate"
    summary = ("DiffRate: per block, keep the patch tokens with the highest class attention, then merge the "
               "least important kept ones into their most similar important token (schedules learned by calibrate)")
    needs_class_token = True
    options = (
        OptionInfo("prune_kept", None, "patch tokens kept after pruning, one per block; default the authors' "
                                       "DeiT-Tiny 1.0 GFLOPs schedule"),
        OptionInfo("merge_kept", None, "patch tokens kept after merging, one per block; default as prune_kept"),
        OptionInfo("prop_attn", True, "proportional attention: add log(size) to the attention logits"),
    )

    def validate(self) -> None:
        c = self.config
        if (c["prune_kept"] is None) != (c["merge_kept"] is None):
            raise TokenSparseError("give prune_kept and merge_kept together (or neither, for the default schedule)")
        for name in ("prune_kept", "merge_kept"):
            if c[name] is not None:
                _counts(c[name], name, len(c[name]))
        check_bool(c["prop_attn"], "prop_attn")
        self.prop_attn = c["prop_attn"]

    def schedule(self, depth: int, patches: int) -> tuple[list[int | None], list[int | None]]:
        """Per-block patch tokens kept after pruning and after merging."""
        c = self.config
        if c["prune_kept"] is None:
            p, m = default_schedule(depth, patches)
            return list(p), list(m)
        return _counts(c["prune_kept"], "prune_kept", depth), _counts(c["merge_kept"], "merge_kept", depth)

    def build_reducers(self, depth: int) -> dict[int, TokenReducer]:
        return self.reducers(depth, 196)

    def reducers(self, depth: int, patches: int) -> dict[int, TokenReducer]:
        """``{block: reducer}`` for ``depth`` blocks of ``patches`` patch tokens."""
        prune, merge = self.schedule(depth, patches)
        return {i: DiffRateReducer(p, m) for i, (p, m) in enumerate(zip(prune, merge))
                if p is not None or m is not None}

    def reducers_for(self, family: Any) -> dict[int, TokenReducer]:
        return self.reducers(family.depth, family.num_positions())


__all__ = ["AUTHORS_TINY_1G", "DiffRate", "DiffRateReducer", "default_schedule", "merge_unimportant"]

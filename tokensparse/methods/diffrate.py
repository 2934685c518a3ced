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
from torch import Tensor, nn

from ..errors import TokenSparseError
from ..families import AttentionExtras
from ..ops import (
    add_tokens_,
    average_into_,
    gather_tokens,
    group_assignment,
    pairwise_cosine,
    prefix_assignment,
    with_prefix,
)
from ..state import TokenState
from .base import BlockReducerMethod, TokenReducer, prune_to
from .options import PROP_ATTN, OptionInfo, check_count

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


def ste_ceil(x: Tensor) -> Tensor:
    """``ceil(x)`` whose gradient is the identity's (straight-through, the authors' ``STE_Ceil``)."""
    return x + (x.ceil() - x).detach()


class RateChoice(nn.Module):
    """DiffRate's differentiable discrete proxy (the authors' ``DiffRate/ddp.py``): a softmax over
    candidate kept counts ``n, n - g, n - 2 g, ...`` (``g``: the granularity).

    :meth:`kept` is the expected count rounded up, with a straight-through gradient; :meth:`mask`
    the hard keep mask of the tokens ranked ``k..upto-1`` out (zeros there), carrying the gradient of
    each token's probability of being kept (``sum`` of the probabilities of the candidates above
    its rank), as theirs.
    """

    def __init__(self, n: int, granularity: int = 1) -> None:
        super().__init__()
        self.register_buffer("candidates", torch.arange(n, 0, -granularity, dtype=torch.float32), persistent=False)
        self.logits = nn.Parameter(torch.zeros(len(self.candidates)))

    def probs(self) -> Tensor:
        return self.logits.softmax(dim=-1)

    def kept(self) -> Tensor:
        """Expected kept count, rounded up (a 0-d tensor with a straight-through gradient)."""
        return ste_ceil(self.candidates @ self.probs())

    def mask(self, k: int, upto: int, n: int) -> Tensor:
        """``(n,)`` keep mask: 0 at ranks ``k..upto-1``, 1 elsewhere, with the keep probabilities' gradient."""
        ranks = torch.arange(n, device=self.logits.device, dtype=torch.float32)
        prob = (self.candidates.unsqueeze(0) > ranks.unsqueeze(1)).float() @ self.probs()
        hard = torch.ones(n, device=self.logits.device)
        hard[k:upto] = 0
        return hard - prob.detach() + prob


class DiffRateReducer(TokenReducer):
    """Keep ``prune_kept`` patch tokens by class attention, then merge all but ``merge_kept`` of them.

    With learnable ``rates`` (two :class:`RateChoice`, for pruning and merging) and in training mode, the
    counts come from the rates and tokens are masked instead of removed (DiffRate's search, see
    :meth:`learn`); ``kept`` then holds the two counts of the last pass, with their gradients.
    """
    needs = frozenset({"cls_attn"})

    def __init__(self, prune_kept: int | None, merge_kept: int | None) -> None:
        super().__init__()
        self.prune_kept, self.merge_kept = prune_kept, merge_kept
        self.rates: nn.ModuleList | None = None
        self.kept: tuple[Tensor, Tensor] | None = None

    def learnable(self, n: int, granularity: int) -> None:
        """Give this block learnable rates over ``n`` patch tokens (the authors' search)."""
        self.rates = nn.ModuleList([RateChoice(n, granularity), RateChoice(n, granularity)])

    def learned(self) -> tuple[int, int]:
        """The learned counts (prune, merge) as plain ints."""
        assert self.rates is not None
        return int(self.rates[0].kept().item()), int(self.rates[1].kept().item())

    def extra_repr(self) -> str:
        return f"prune_kept={self.prune_kept}, merge_kept={self.merge_kept}"

    def counts(self, n: int) -> tuple[int, int]:
        """Patch tokens left after pruning and after merging, out of ``n``."""
        k1 = n if self.prune_kept is None else min(n, self.prune_kept)
        k2 = k1 if self.merge_kept is None else min(k1, self.merge_kept)
        return k1, max(k2, 1)

    def forward(self, x: Tensor, extras: AttentionExtras, state: TokenState, block: int) -> Tensor:
        if self.rates is not None and self.training:
            return self.learn(x, extras, state, block)
        P = state.num_prefix
        n = x.shape[1] - P
        k1, k2 = self.counts(n)
        if k2 < n:
            order = extras.cls_attn.mean(dim=1)[:, P:].argsort(dim=-1, descending=True)
            if k2 < k1:
                x = prune_and_merge(x, order[:, :k2], order[:, k2:k1], state)
            else:
                x = prune_to(x, with_prefix(order[:, :k1], P), state)
        state.record(block, x)
        return x

    def learn(self, x: Tensor, extras: AttentionExtras, state: TokenState, block: int) -> Tensor:
        """DiffRate's training pass (the authors' ``DiffRateBlock.forward`` in training mode): tokens sorted
        by class attention (masked ones last), the pruned ones masked, the merged ones averaged into their
        most similar important token and masked; the masks carry the rates' gradients
        (:class:`RateChoice`) and the attention of later blocks honours them (``state.policy``)."""
        assert self.rates is not None
        P = state.num_prefix
        B, N, _ = x.shape
        n = N - P
        policy = state.policy if state.policy is not None else x.new_ones(B, n, 1)
        alive = policy.detach().squeeze(-1) > 0.5
        score = extras.cls_attn.mean(dim=1)[:, P:].detach().float().masked_fill(~alive, float("-inf"))
        order = score.argsort(dim=-1, descending=True)
        xp = gather_tokens(x[:, P:], order)
        size = gather_tokens(state.sizes(x)[:, P:], order)
        policy = gather_tokens(policy, order)
        last = int(alive[0].sum())
        prune_kept, merge_kept = self.rates[0].kept(), self.rates[1].kept()
        k1 = int(prune_kept.item())
        if k1 < last:
            policy = policy * self.rates[0].mask(k1, last, n).view(1, n, 1).to(policy.dtype)
        mid = min(last, k1)
        k2 = int(merge_kept.item())
        if 0 < k2 < mid:
            merged, sim_max, idx = join_similar(xp[:, :k2], xp[:, k2:mid])
            xp = torch.cat([merged, xp[:, k2:]], dim=1)
            scaled = torch.cat([size[:, :k2], size[:, k2:mid] * sim_max.unsqueeze(-1)], dim=1).clamp_min(1)
            size = torch.cat([add_tokens_(scaled[:, :k2].clone(), idx, scaled[:, k2:]), scaled[:, k2:],
                              size[:, mid:]], dim=1)
            policy = policy * self.rates[1].mask(k2, mid, n).view(1, n, 1).to(policy.dtype)
        inverse = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=x.device).expand(B, -1))
        state.update(prefix_assignment(inverse, P), torch.cat([state.sizes(x)[:, :P], size], dim=1))
        state.policy = policy
        self.kept = (prune_kept, merge_kept)
        x = torch.cat([x[:, :P], xp], dim=1)
        state.record(block, x)
        return x


def join_targets(keep: Tensor, join: Tensor) -> tuple[Tensor, Tensor]:
    """For each of the tokens ``join`` ``(B, m, C)``, its similarity to and index of its most similar token
    of ``keep`` ``(B, k, C)`` ``(B, m)`` (cosine; a choice: no gradient)."""
    return pairwise_cosine(join.detach(), keep.detach()).max(dim=-1)


def join_similar(keep: Tensor, join: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each of the tokens ``join`` ``(B, m, C)`` joins its most similar of ``keep`` ``(B, k, C)`` (cosine; the
    authors' ``scatter_reduce(mode="mean")``): the plain means of the groups ``(B, k, C)``, and each joining
    token's similarity and target ``(B, m)`` (:func:`join_targets`)."""
    sim_max, dst = join_targets(keep, join)
    B, k, m = keep.shape[0], keep.shape[1], join.shape[1]
    count = add_tokens_(keep.new_ones(B, k, 1), dst, keep.new_ones(B, m, 1))
    return add_tokens_(keep.clone(memory_format=torch.contiguous_format), dst, join) / count, sim_max, dst


def prune_and_merge(x: Tensor, important: Tensor, merged: Tensor, state: TokenState) -> Tensor:
    """DiffRate's pruning and merging in one pass over ``x`` ``(B, N, C)``: the patch tokens ``important``
    ``(B, k)`` stay (in that order), each of ``merged`` ``(B, m)`` joins its most similar important token
    (cosine of the tokens; a plain mean of the group, sizes scaled by the similarity before they add up),
    every other patch token is dropped. :func:`join_similar` on the joined rows only
    (:func:`~tokensparse.ops.average_into_`). Updates ``state``."""
    P = state.num_prefix
    out = gather_tokens(x, with_prefix(important, P))
    join = gather_tokens(x[:, P:], merged)
    sim_max, dst = join_targets(out[:, P:], join)
    ones = out.new_ones(1, 1, 1)
    average_into_(out, ones.expand(*out.shape[:2], 1), join, ones.expand(*join.shape[:2], 1), dst + P)
    sizes = state.sizes(x)
    size = sizes[:, P:]
    scaled = gather_tokens(size, merged) * sim_max.unsqueeze(-1).to(size.dtype)
    new_size = add_tokens_(gather_tokens(size, important).clone(memory_format=torch.contiguous_format), dst, scaled)
    assign = group_assignment(size.shape[1], None, important, merged, dst)
    state.update(prefix_assignment(assign, P), torch.cat([sizes[:, :P], new_size], dim=1))
    return out


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
    summary = "DiffRate: prune by class attention, merge the least important kept tokens (counts learned by calibrate)"
    needs_class_token = True
    options = (
        OptionInfo("prune_kept", None, "patch tokens kept after pruning, one per block; default the authors' "
                                       "DeiT-Tiny 1.0 GFLOPs schedule"),
        OptionInfo("merge_kept", None, "patch tokens kept after merging, one per block; default as prune_kept"),
        PROP_ATTN,
    )

    def validate(self) -> None:
        c = self.config
        if (c["prune_kept"] is None) != (c["merge_kept"] is None):
            raise TokenSparseError("give prune_kept and merge_kept together (or neither, for the default schedule)")
        for name in ("prune_kept", "merge_kept"):
            if c[name] is not None:
                _counts(c[name], name, len(c[name]))
        self.use_prop_attn()

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


__all__ = ["AUTHORS_TINY_1G", "DiffRate", "DiffRateReducer", "RateChoice", "default_schedule", "join_similar", "join_targets",
           "prune_and_merge",
           "ste_ceil"]

"""Bipartite soft matching (ToMe) and size-weighted merging.

Works on patch tokens only: callers split off prefix tokens, which are never merged.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .mctf import sum_tokens
from .select import add_tokens_, gather_tokens


class MergePlan(NamedTuple):
    """Which tokens of set A (even positions) merge into which of set B (odd positions).

    ``unm``: ``(B, nA - r)`` A-indices left alone (ascending); ``src``: ``(B, r)`` A-indices
    merged away; ``dst``: ``(B, r)`` the B-index each ``src`` merges into. ``a_start`` is 0
    when A holds the even positions and 1 when it holds the odd ones.
    """
    unm: Tensor
    src: Tensor
    dst: Tensor
    a_start: int = 0


def _split_ab(t: Tensor, a_start: int) -> tuple[Tensor, Tensor]:
    return t[:, a_start::2], t[:, 1 - a_start::2]


def bipartite_soft_matching(metric: Tensor, r: int, a_start: int = 0) -> MergePlan:
    """Plan merging ``r`` of ``n`` patch tokens by cosine similarity of ``metric`` ``(B, n, C)``.

    Tokens alternate into sets A and B (A starts at position ``a_start``); each A token picks
    its most similar B token and the ``r`` A tokens with the highest similarity are merged into
    their partner. ``r`` must be in ``[0, len(A)]`` (callers cap it at ``n // 2``).
    """
    metric = F.normalize(metric.float(), dim=-1)
    a, b = _split_ab(metric, a_start)
    best, partner = (a @ b.transpose(-1, -2)).max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src = order[:, :r]
    unm = order[:, r:].sort(dim=-1).values
    return MergePlan(unm=unm, src=src, dst=partner.gather(1, src), a_start=a_start)


def merge_tokens(x: Tensor, size: Tensor, plan: MergePlan) -> tuple[Tensor, Tensor]:
    """Apply ``plan`` to patch tokens ``x`` ``(B, n, C)`` as size-weighted averages.

    Returns merged tokens ``(B, n - r, C)`` ordered ``[unmerged A, B]`` and their sizes. Set A
    index ``j`` is position ``2 j + a_start`` of ``x``: merged rows are gathered from the whole
    weighted tensor and added into a copy of set B.
    """
    a, b = plan.a_start, 1 - plan.a_start
    weighted = x * size
    src = 2 * plan.src + a
    xb = add_tokens_(weighted[:, b::2].clone(memory_format=torch.contiguous_format), plan.dst,
                     gather_tokens(weighted, src))
    sb = add_tokens_(size[:, b::2].clone(memory_format=torch.contiguous_format), plan.dst, gather_tokens(size, src))
    unm = 2 * plan.unm + a
    merged_size = torch.cat([gather_tokens(size, unm), sb], dim=1)
    merged = torch.cat([gather_tokens(weighted, unm), xb], dim=1) / merged_size
    return merged, merged_size


def average_into_(out: Tensor, weight: Tensor, src: Tensor, src_weight: Tensor, dst: Tensor) -> Tensor:
    """Average the tokens ``src`` ``(B, r, C)`` into the rows ``dst`` ``(B, r)`` of ``out`` ``(B, m, C)`` in place
    (a tensor the caller made; several may join one row): row ``j`` becomes the ``weight``-ed average of
    itself and the tokens that join it. ``weight`` ``(B, m, 1)``, ``src_weight`` ``(B, r, 1)``; returns
    the rows' total weights ``(B, m, 1)``.

    Touches the ``r`` joined rows only (a row nothing joins is left as it is), where averaging every
    group (``sum(w * x) / sum(w)``) passes over all the tokens three more times.
    """
    total = add_tokens_(weight.clone(memory_format=torch.contiguous_format), dst, src_weight)
    inv = gather_tokens(total, dst).reciprocal()
    own = gather_tokens(weight, dst) * inv
    # each of the j tokens joining a row adds 1/j of that row's rescaling (own - 1) x
    joins = gather_tokens(add_tokens_(torch.zeros_like(total), dst, torch.ones_like(src_weight)), dst)
    add_tokens_(out, dst, gather_tokens(out, dst) * ((own - 1) / joins).to(out.dtype)
                + src * (src_weight * inv).to(out.dtype))
    return total


def merge_rows(x: Tensor, size: Tensor, keep: Tensor, src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """Tokens ``x`` ``(B, N, C)`` of sizes ``size`` ``(B, N, 1)`` reduced to the rows ``keep`` ``(B, m)``, in
    that order, each row ``src`` ``(B, r)`` merged into the kept row ``dst`` ``(B, r)`` (an index into
    ``keep``; several may share one) as the size-weighted average of the group (:func:`average_into_`).
    Returns the tokens ``(B, m, C)`` and their sizes ``(B, m, 1)``."""
    out = gather_tokens(x, keep)
    return out, average_into_(out, gather_tokens(size, keep), gather_tokens(x, src), gather_tokens(size, src), dst)


def merge_assignment(plan: MergePlan, n: int) -> Tensor:
    """Old-to-new map ``(B, n)`` over patch tokens for ``plan`` (new index after merging)."""
    B, n_unm = plan.unm.shape
    dev = plan.unm.device
    n_a = (n + 1 - plan.a_start) // 2
    n_b = n - n_a
    assign_a = torch.empty(B, n_a, dtype=torch.long, device=dev)
    assign_a.scatter_(1, plan.unm, torch.arange(n_unm, device=dev).expand(B, -1))
    assign_a.scatter_(1, plan.src, plan.dst + n_unm)
    assign_b = (torch.arange(n_b, device=dev) + n_unm).expand(B, -1)
    assign = torch.empty(B, n, dtype=torch.long, device=dev)
    assign[:, plan.a_start::2] = assign_a
    assign[:, 1 - plan.a_start::2] = assign_b
    return assign


def group_assignment(n: int, kept: Tensor | None, into: Tensor | None, src: Tensor | None = None,
                     dst: Tensor | None = None) -> Tensor:
    """Old-to-new map ``(B, n)`` over ``n`` tokens: ``kept`` ``(B, k)`` positions stay as themselves
    (new indices ``0..k-1``, in the order given), ``into`` ``(B, m)`` positions follow (``k..k+m-1``),
    and each of the positions ``src`` ``(B, r)`` joins the ``into`` token ``dst`` ``(B, r)`` (an index
    into ``into``). Every other position maps to -1 (dropped). Either of ``kept`` / ``into`` may be None.
    """
    ref = next(t for t in (kept, into) if t is not None)
    B, dev = ref.shape[0], ref.device
    assign = torch.full((B, n), -1, dtype=torch.long, device=dev)
    k = 0
    if kept is not None:
        k = kept.shape[1]
        assign.scatter_(1, kept, torch.arange(k, device=dev).expand(B, -1))
    if into is not None:
        assign.scatter_(1, into, torch.arange(into.shape[1], device=dev).expand(B, -1) + k)
        if src is not None and dst is not None:
            assign.scatter_(1, src, dst + k)
    return assign


def prefix_assignment(assign: Tensor, num_prefix: int) -> Tensor:
    """A patch-token map ``(B, n)`` (-1: dropped) as a map over the whole sequence, prefix tokens first and kept."""
    if num_prefix == 0:
        return assign
    shifted = torch.where(assign < 0, assign, assign + num_prefix)
    prefix = torch.arange(num_prefix, device=assign.device).expand(assign.shape[0], -1)
    return torch.cat([prefix, shifted], dim=1)


def pairwise_cosine(a: Tensor, b: Tensor | None = None) -> Tensor:
    """Cosine similarity ``(B, n, m)`` between tokens ``a`` ``(B, n, C)`` and ``b`` ``(B, m, C)`` (None: ``a``), in float32."""
    a = F.normalize(a.float(), dim=-1)
    b = a if b is None else F.normalize(b.float(), dim=-1)
    return a @ b.transpose(-1, -2)


def mlerp_tokens(x: Tensor, size: Tensor, assign: Tensor, n: int) -> Tensor:
    """ToFu's MLERP merge ``(B, n, C)`` of the tokens ``x`` ``(B, N, C)`` that ``assign`` ``(B, N)`` groups:
    the size-weighted average, rescaled to the largest norm among the group's members (the
    average's direction, the norm of the largest input), so merging does not shrink the norm."""
    avg = sum_tokens(x * size, assign, n) / sum_tokens(size, assign, n)
    norms = x.norm(dim=-1)
    top = norms.new_zeros(x.shape[0], n).scatter_reduce(1, assign, norms, reduce="amax", include_self=False)
    return avg * (top / avg.norm(dim=-1).clamp_min(torch.finfo(avg.dtype).tiny)).unsqueeze(-1)

"""Multi-criteria token fusion (MCTF, Lee et al., CVPR 2024): the matching and the group pooling.

Pure tensor functions on the patch tokens (callers split off prefix tokens, which are never
merged). The score of merging set-A token ``i`` with set-B token ``j`` is the product of three
criteria, each raised to ``1 / tau`` (a ``tau`` of 0 turns the criterion off), as in the
authors' ``utils/mctf.py``::

    ((cos(x_i, x_j) + 1) / 2) ** (1 / tau_sim)                        similarity
    (inf_i * inf_j) ** (1 / tau_info),  inf = 1 / attention received   informativeness
    (s_i * s_j) ** (1 / tau_size),      s = 1 / size                   size

(``inf`` and ``s`` normalised by their maximum over the whole sequence, prefix included). The
per-token factors are raised to their powers before the outer product, which is the same
product at a fraction of the cost.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .select import add_tokens_, gather_tokens


def _factor(values: Tensor, tau: float) -> Tensor | None:
    """``(values / max(values)) ** (1 / tau)`` per token ``(B, N)``, or None when the criterion is off."""
    if not tau:
        return None
    v = values.float()
    return (v / v.amax(dim=1, keepdim=True)) ** (1.0 / tau)


def mctf_scores(metric: Tensor, received: Tensor | None, size: Tensor | None, num_prefix: int,
                tau_sim: float, tau_info: float, tau_size: float) -> tuple[Tensor, int]:
    """Merge scores ``(B, nA, nB)`` between the patch tokens of sets A and B, and ``a_start``.

    ``metric`` ``(B, N, C)`` (the tokens themselves in MCTF), ``received`` ``(B, N)`` the mean
    attention each token receives (over heads and queries), ``size`` ``(B, N, 1)`` or None (all
    ones); ``N`` counts the ``num_prefix`` prefix tokens, which are left out of both sets. Sets
    alternate over the whole sequence as in the authors' code (a class token would be the first
    of set A), so A starts at patch ``num_prefix % 2``.
    """
    P = num_prefix
    a_start = P % 2
    metric = F.normalize(metric[:, P:].float(), dim=-1)
    a, b = metric[:, a_start::2], metric[:, 1 - a_start::2]
    if tau_sim:
        scores = ((a @ b.transpose(-1, -2) + 1) / 2)
        if tau_sim != 1:
            scores = scores ** (1.0 / tau_sim)
    else:
        scores = a.new_ones(a.shape[0], a.shape[1], b.shape[1])
    per_token = None
    for f in (None if received is None else _factor(1.0 / received.float(), tau_info),
              None if size is None else _factor(1.0 / size.squeeze(-1).float(), tau_size)):
        if f is not None:
            per_token = f if per_token is None else per_token * f
    if per_token is not None:
        t = per_token[:, P:]
        scores = scores * t[:, a_start::2].unsqueeze(-1) * t[:, 1 - a_start::2].unsqueeze(1)
    return scores, a_start


def mctf_assignment(scores: Tensor, r: int, a_start: int, sort_unmerged: bool = True,
                    bidirectional: bool = True) -> Tensor:
    """Old-to-new map ``(B, n)`` over the ``n = nA + nB`` patch tokens for merging ``r`` of them.

    Bidirectional matching as the authors' code: ``r // 2`` A tokens with the highest best score
    merge into their best B token, then ``r - r // 2`` B tokens (scored against the A tokens
    left, with the same scores) merge into their best A token; one-way matching merges all ``r``
    from A. New order: the A tokens left (ascending when ``sort_unmerged``, the authors' order
    with a class token; else by falling score), then the B tokens left (bidirectional: by
    falling score, as the authors' code leaves them; one-way: all of B in order).
    """
    B, nA, nB = scores.shape
    dev = scores.device
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src, unm = order[:, :r1], order[:, r1:]
    if sort_unmerged:
        unm = unm.sort(dim=-1).values
    n_unm = nA - r1
    new_b = torch.empty(B, nB, dtype=torch.long, device=dev)
    if bidirectional:
        back = scores.gather(1, unm.unsqueeze(-1).expand(B, n_unm, nB)).transpose(1, 2)  # (B, nB, n_unm)
        best2, partner2 = back.max(dim=-1)
        order2 = best2.sort(dim=-1, descending=True).indices
        src2, unm2 = order2[:, :r2], order2[:, r2:]
        new_b.scatter_(1, unm2, torch.arange(nB - r2, device=dev).expand(B, -1) + n_unm)
        new_b.scatter_(1, src2, partner2.gather(1, src2))
    else:
        new_b.copy_((torch.arange(nB, device=dev) + n_unm).expand(B, -1))
    new_a = torch.empty(B, nA, dtype=torch.long, device=dev)
    new_a.scatter_(1, unm, torch.arange(n_unm, device=dev).expand(B, -1))
    new_a.scatter_(1, src, new_b.gather(1, partner.gather(1, src)))
    assign = torch.empty(B, nA + nB, dtype=torch.long, device=dev)
    assign[:, a_start::2] = new_a
    assign[:, 1 - a_start::2] = new_b
    return assign


def sum_tokens(x: Tensor, assign: Tensor, n: int) -> Tensor:
    """``(B, n, ...)``: row ``j`` is the sum of the rows of ``x`` ``(B, N, ...)`` that ``assign`` ``(B, N)`` sends to ``j``."""
    out = x.new_zeros(x.shape[0], n, *x.shape[2:])
    return add_tokens_(out, assign, x)


def group_weights(weights: Tensor, assign: Tensor, n: int) -> Tensor:
    """``weights`` ``(B, N, 1)`` divided by the sum over each token's group, so that pooling
    ``sum_tokens(x * w, assign, n)`` is a weighted average within each group."""
    return weights / gather_tokens(sum_tokens(weights, assign, n), assign)


__all__ = ["group_weights", "mctf_assignment", "mctf_scores", "sum_tokens"]

"""Selection primitives: top-k of scores, gathering tokens, fusing dropped tokens."""
from __future__ import annotations

import torch
from torch import Tensor


def topk_indices(scores: Tensor, k: int, sort: bool = True) -> Tensor:
    """Indices ``(B, k)`` of the ``k`` highest scores per row, ascending if ``sort``.

    Ascending order keeps kept tokens in their spatial order.
    """
    idx = scores.topk(k, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values if sort else idx


def split_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(keep, drop)`` index tensors: the ``k`` highest scores (ascending index) and the rest."""
    order = scores.argsort(dim=-1, descending=True)
    return order[:, :k].sort(dim=-1).values, order[:, k:]


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Gather tokens ``x[b, idx[b, i]]`` from ``x`` ``(B, N, C)`` with ``idx`` ``(B, K)``."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def fuse_tokens(x: Tensor, weights: Tensor) -> Tensor:
    """One token ``sum_i weights_i * x_i`` ``(B, 1, C)`` from tokens ``(B, K, C)`` and weights ``(B, K)``."""
    return (x * weights.unsqueeze(-1)).sum(dim=1, keepdim=True)


def with_prefix(idx: Tensor, num_prefix: int) -> Tensor:
    """Turn patch-token indices into full-sequence indices, prefix tokens first."""
    if num_prefix == 0:
        return idx
    prefix = torch.arange(num_prefix, device=idx.device).expand(idx.shape[0], -1)
    return torch.cat([prefix, idx + num_prefix], dim=1)


def keep_assignment(keep: Tensor, n_old: int, num_prefix: int) -> Tensor:
    """Old-to-new token map ``(B, n_old)`` for keeping full-sequence indices ``keep``.

    Entry ``i`` is the new position of old token ``i``, or -1 if it was dropped.
    """
    B, K = keep.shape
    assign = keep.new_full((B, n_old), -1)
    pos = torch.arange(K, device=keep.device).expand(B, -1)
    return assign.scatter(1, keep, pos)

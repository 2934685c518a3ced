"""Selection primitives: top-k of scores, gathering tokens, fusing dropped tokens."""
from __future__ import annotations

from collections.abc import Callable

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


def _rows(idx: Tensor, n: int) -> Tensor:
    """Indices ``(B * K,)`` into the ``B * n`` rows of a flattened ``(B, n, ...)`` tensor for ``idx`` ``(B, K)``."""
    offsets = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * n
    return (idx + offsets).reshape(-1)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Gather tokens ``x[b, idx[b, i]]`` ``(B, K, C)`` from ``x`` ``(B, N, C)`` with ``idx`` ``(B, K)``.

    Whole rows are copied (``index_select`` on the flattened batch): about 3x faster on a CPU
    than ``gather`` with an index expanded over the channels, which reads one index per value.
    """
    B, N = x.shape[:2]
    return x.reshape(B * N, *x.shape[2:]).index_select(0, _rows(idx, N)).view(B, idx.shape[1], *x.shape[2:])


def scatter_tokens(base: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    """``base`` ``(B, N, C)`` with rows ``idx`` ``(B, K)`` replaced by ``src`` ``(B, K, C)`` (a new tensor;
    ``idx`` distinct per row)."""
    B, N = base.shape[:2]
    rows = base.reshape(B * N, *base.shape[2:]).index_copy(0, _rows(idx, N), src.reshape(-1, *src.shape[2:]))
    return rows.view(base.shape)


def add_tokens_(base: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    """Add ``src`` ``(B, K, C)`` to rows ``idx`` ``(B, K)`` of ``base`` ``(B, N, C)`` in place (repeats
    accumulate); ``base`` must be a contiguous tensor the caller made (a fresh ``clone``, not a view
    that ``.contiguous()`` may return as it is). Returns it."""
    B, N = base.shape[:2]
    base.view(B * N, *base.shape[2:]).index_add_(0, _rows(idx, N), src.reshape(-1, *src.shape[2:]))
    return base


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


def route_tokens(x: Tensor, slow_fn: Callable[[Tensor], Tensor], fast_fn: Callable[[Tensor], Tensor],
                 mask: Tensor | None = None, slow_idx: Tensor | None = None,
                 fast_idx: Tensor | None = None) -> Tensor:
    """Send each of the tokens ``x`` ``(B, N, C)`` through ``slow_fn`` or ``fast_fn``, in place.

    Either ``mask`` ``(B, N, 1)`` (1: slow, 0: fast; differentiable: both functions run on
    every token and the result is ``mask * slow + (1 - mask) * fast``), or index tensors
    ``slow_idx`` ``(B, K)`` (ascending) and ``fast_idx`` ``(B, N - K)``: each function runs on
    its gathered tokens only and the results are scattered back to their positions (real
    savings; with ``K == N`` the slow function runs on ``x`` itself). Both functions map
    ``(B, n, C)`` to ``(B, n, C')``; the output is ``(B, N, C')``.
    """
    if mask is not None:
        return mask * slow_fn(x) + (1 - mask) * fast_fn(x)
    if slow_idx is None or fast_idx is None:
        raise ValueError("route_tokens needs a mask or both slow_idx and fast_idx")
    if fast_idx.shape[1] == 0:
        return slow_fn(x)
    slow = slow_fn(gather_tokens(x, slow_idx))
    fast = fast_fn(gather_tokens(x, fast_idx))
    dtype = torch.promote_types(slow.dtype, fast.dtype)
    out = slow.new_zeros(x.shape[0], x.shape[1], slow.shape[-1], dtype=dtype)
    return scatter_tokens(scatter_tokens(out, slow_idx, slow.to(dtype)), fast_idx, fast.to(dtype))

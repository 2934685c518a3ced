"""Attention primitives: class-attention rows, the proportional-attention bias, masked softmax
and attention biases for tokens that have (or lack) a grid position."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def class_attention(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None,
                    query: str = "first") -> Tensor:
    """Softmax attention row of one query over all keys, per head.

    Args:
        q: queries ``(B, H, M, D)``; only the first (``query="first"``, the class token) or
            their mean (``query="mean"``, for models without a class token) is used, so the
            cost is O(N).
        k: keys ``(B, H, N, D)``.
        scale: the attention scale (``D ** -0.5`` for standard attention).
        bias: optional additive logit bias broadcastable to ``(B, H, M, N)``; the mean
            query's bias is the mean of the bias rows (its logits are the mean logits).
        query: ``"first"`` or ``"mean"``.

    Returns:
        ``(B, H, N)`` attention weights, computed in fp32 and cast back.
    """
    if query == "first":
        qc = q[:, :, :1]
        b = None if bias is None else bias[..., :1, :]
    else:
        qc = q.mean(dim=2, keepdim=True)
        b = None if bias is None else bias.mean(dim=-2, keepdim=True)
    qc, k = qc.float() * scale, k.float()
    # one product per head: a head's keys (B, N, D) are a strided matrix of the qkv projection that a batched
    # matmul takes as it is, where one matmul over all heads first copies the permuted keys (about 3x slower)
    logits = torch.cat([qc[:, h] @ k[:, h].transpose(-1, -2) for h in range(k.shape[1])], dim=1).unsqueeze(2)
    if b is not None:
        logits = logits + b.float()
    return logits.softmax(dim=-1).squeeze(2).to(q.dtype)


def attention_matrix(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """The whole attention matrix ``(B, N, N)`` averaged over heads, in fp32, from ``q``, ``k``
    ``(B, H, N, D)`` and an optional logit bias (O(N^2) memory: for analysis, not eval paths)."""
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1).mean(dim=1)


def attention_probs(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """Per-head attention probabilities ``(B, H, M, N)`` from ``q`` ``(B, H, M, D)``, ``k`` ``(B, H, N, D)``
    and an optional logit bias, softmax in fp32, cast back to ``q``'s dtype (for methods that need
    what every token receives, MCTF: computed only in the blocks that reduce)."""
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1).to(q.dtype)


def attention_by_head(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None = None,
                      dropout: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Attention on explicit probabilities, one head at a time: the output ``(B, H, N, D)`` of ``q``, ``k``,
    ``v`` ``(B, H, N, D)`` and each head's probabilities ``(B, N, N)`` (:func:`attention_probs`, ``dropout``
    applied to them before the values; ``bias`` broadcastable to ``(B, H, N, N)``).

    A static loop over heads: each ``(B, N, N)`` buffer is a sixth of a ViT-S's ``(B, H, N, N)``
    tensor, small enough for the cache and for the allocator to reuse, where one whole tensor is
    fresh memory in every block (about 2x faster on a CPU; the same numbers).
    """
    outs, probs = [], []
    for h in range(q.shape[1]):
        b = bias if bias is None or bias.dim() < 4 else bias[:, h if bias.shape[1] > 1 else 0]
        p = attention_probs(q[:, h], k[:, h], scale, b)
        probs.append(p)
        outs.append((p if dropout is None else dropout(p)) @ v[:, h])
    return torch.stack(outs, dim=1), tuple(probs)


def attention_rollout(matrices: list[Tensor], residual: float = 0.5) -> Tensor:
    """Attention rollout (Abnar and Zuidema, 2020) through consecutive blocks: the product of
    ``residual * I + (1 - residual) * A`` over the head-averaged attention matrices ``A`` ``(B, N, N)``,
    last block first, so row ``i`` is how much each token entering the first block reaches token
    ``i`` after the last one."""
    eye = torch.eye(matrices[0].shape[-1], device=matrices[0].device, dtype=matrices[0].dtype)
    out = None
    for a in reversed(matrices):
        step = residual * eye + (1 - residual) * a
        out = step if out is None else out @ step
    return out


def size_bias(size: Tensor) -> Tensor:
    """Proportional-attention bias ``log(size)`` per key, shaped ``(B, 1, 1, N)``."""
    return size.log().reshape(size.shape[0], 1, 1, -1)


def policy_softmax(logits: Tensor, policy: Tensor, eps: float = 1e-12) -> Tensor:
    """Softmax over keys where only kept keys (``policy`` ``(B, N)`` = 1) and the query itself count.

    ``logits``: ``(B, H, N, N)``. Computed in fp32 as ``softmax * allow`` renormalised, which
    is multiplicative, so gradients reach ``policy`` (DynamicViT's formulation). With an
    all-ones policy this is ``softmax`` up to rounding.
    """
    n = logits.shape[-1]
    keys = policy.float().reshape(policy.shape[0], 1, 1, n)
    eye = torch.eye(n, dtype=torch.float32, device=logits.device)
    allow = keys + (1.0 - keys) * eye
    weights = logits.float().softmax(dim=-1) * allow
    return weights / (weights.sum(dim=-1, keepdim=True) + eps)


def pad_bias(bias: Tensor, before: int, after: int) -> Tensor:
    """Zero rows and columns for ``before`` leading and ``after`` trailing tokens without a position."""
    if before == 0 and after == 0:
        return bias
    return F.pad(bias, (before, after, before, after))


def gather_bias(bias: Tensor, positions: Tensor) -> Tensor:
    """``(B, H, k, k)`` attention bias among the grid ``positions`` ``(B, k)`` from ``bias`` ``(H, N, N)``."""
    B, k = positions.shape
    H, N, _ = bias.shape
    rows = bias.unsqueeze(0).expand(B, H, N, N).gather(2, positions.view(B, 1, k, 1).expand(B, H, k, N))
    return rows.gather(3, positions.view(B, 1, 1, k).expand(B, H, k, k))

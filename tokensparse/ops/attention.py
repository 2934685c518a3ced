"""Attention primitives: the class-attention row and the proportional-attention bias."""
from __future__ import annotations

from typing import Optional

from torch import Tensor


def class_attention(q: Tensor, k: Tensor, scale: float, bias: Optional[Tensor] = None) -> Tensor:
    """Softmax attention row of the first (class) query over all keys.

    Args:
        q: queries ``(B, H, N, D)``; only ``q[:, :, :1]`` is used, so the cost is O(N).
        k: keys ``(B, H, N, D)``.
        scale: the attention scale (``D ** -0.5`` for standard attention).
        bias: optional additive logit bias broadcastable to ``(B, H, 1, N)``.

    Returns:
        ``(B, H, N)`` attention weights, computed in fp32 and cast back.
    """
    logits = (q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1).squeeze(2).to(q.dtype)


def size_bias(size: Tensor) -> Tensor:
    """Proportional-attention bias ``log(size)`` per key, shaped ``(B, 1, 1, N)``."""
    return size.log().reshape(size.shape[0], 1, 1, -1)

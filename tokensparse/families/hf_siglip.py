"""Hugging Face ``transformers`` SigLIP vision towers (``SiglipVisionModel``, ``SiglipForImageClassification``;
a ``SiglipModel``'s ``vision_model`` is a ``SiglipVisionModel``).

Embeddings, then ``encoder.layers`` (CLIP's layer layout), then ``post_layernorm``. There is
no class token: methods that score by class attention give the class-token error; ToMe and
DynamicViT work. The pooled output comes from an attention-pooling head (a learned probe
querying every token through an ``nn.MultiheadAttention``): once tokens are merged, each
key gets the bias ``log(size)`` (proportional attention: a merged token weighs as the
patches it holds), and in DynamicViT training the probe's attention is multiplied by the
keep mask and renormalised (gradients reach the mask). ``SiglipForImageClassification``
averages all tokens, weighted by size. See ``hf_base.py``.
"""
from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.siglip.modeling_siglip import (
    SiglipAttention,
    SiglipEncoderLayer,
    SiglipMultiheadAttentionPoolingHead,
    SiglipVisionModel,
)

from ..ops import size_bias
from ..state import TokenState
from .hf import HFSiglipFamily
from .hf_base import EncoderLayout, HFEncoderFamily, LogitHead, mean_pool_logits
from .hf_clip import LAYOUT as CLIP_LAYOUT


def probe_attention(mha: nn.MultiheadAttention, query: Tensor, x: Tensor, size: Tensor | None,
                    policy: Tensor | None) -> Tensor:
    """``mha(query, x, x)[0]`` (batch first) with a ``log(size)`` key bias (``size`` ``(B, N, 1)``) and
    the attention multiplied by a keep mask ``policy`` ``(B, N, 1)`` and renormalised."""
    B, M, E = query.shape
    N, H = x.shape[1], mha.num_heads
    D = E // H
    w, b = mha.in_proj_weight, mha.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
    wq, wk, wv = w.chunk(3)
    q = F.linear(query, wq, bq).view(B, M, H, D).transpose(1, 2)
    k = F.linear(x, wk, bk).view(B, N, H, D).transpose(1, 2)
    v = F.linear(x, wv, bv).view(B, N, H, D).transpose(1, 2)
    logits = (q.float() * D ** -0.5) @ k.float().transpose(-2, -1)
    if size is not None:
        logits = logits + size_bias(size).float()
    weights = logits.softmax(dim=-1)
    if policy is not None:
        weights = weights * policy.float().reshape(B, 1, 1, N)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-12)
    weights = F.dropout(weights, mha.dropout, mha.training).to(v.dtype)
    return mha.out_proj((weights @ v).transpose(1, 2).reshape(B, M, E))


class SiglipTokenHead(nn.Module):
    """SigLIP's attention-pooling head weighting merged tokens by size (and masked ones by the keep mask)."""

    @classmethod
    def problem(cls, head: nn.Module | None) -> str | None:
        """What keeps ``head`` from being patched, or None (no head: ``vision_use_head=False``)."""
        if head is None:
            return None
        mha = getattr(head, "attention", None)
        if not isinstance(head, SiglipMultiheadAttentionPoolingHead) or not isinstance(mha, nn.MultiheadAttention):
            return f"a {type(head).__name__}, not a SiglipMultiheadAttentionPoolingHead with an nn.MultiheadAttention"
        if (not mha.batch_first or not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn
                or not all(isinstance(getattr(head, n, None), (nn.Module, Tensor)) for n in ("probe", "layernorm", "mlp"))):
            return "its attention pooling is not laid out as transformers' (batch-first MultiheadAttention, probe, mlp)"
        return None

    def forward(self, hidden_state: Tensor) -> Tensor:
        state: TokenState = self.__dict__["_ts"].state
        if state.size is None and state.policy is None:
            return super().forward(hidden_state)
        probe = self.probe.repeat(hidden_state.shape[0], 1, 1)
        h = probe_attention(self.attention, probe, hidden_state, state.size, state.policy)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class HFSiglip(HFEncoderFamily, HFSiglipFamily):
    """transformers SigLIP vision tower (no class token)."""
    layout = CLIP_LAYOUT  # SigLIP's encoder layers are laid out as CLIP's
    encoder_layout = EncoderLayout(blocks="encoder.layers", final_norm="post_layernorm")
    layer_classes = (SiglipEncoderLayer,)
    attention_classes = (SiglipAttention,)
    encoder_classes = (SiglipVisionModel,)
    logit_heads: ClassVar[dict[str, LogitHead]] = {"SiglipForImageClassification": mean_pool_logits}
    pooling_heads = tuple(logit_heads)
    encoder_parts: ClassVar[dict[str, type[nn.Module]]] = {"head": SiglipTokenHead}


FAMILY = HFSiglip

__all__ = ["FAMILY", "HFSiglip", "SiglipTokenHead", "probe_attention"]

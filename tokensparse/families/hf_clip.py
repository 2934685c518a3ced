"""Hugging Face ``transformers`` CLIP vision towers (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``,
``CLIPForImageClassification``; a ``CLIPModel``'s ``vision_model`` is a ``CLIPVisionModel``).

Embeddings, then ``pre_layrnorm``, then ``encoder.layers`` of ``layer_norm1`` ->
``self_attn``, ``layer_norm2`` -> ``mlp``. ``last_hidden_state`` is the last layer's output
(no final norm); the pooled output is ``post_layernorm`` of the class token, so it needs no
change. ``CLIPForImageClassification`` averages the patch tokens: weighted by token size
once tokens are merged. See ``hf_base.py``.
"""
from __future__ import annotations

from typing import ClassVar

from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer, CLIPVisionModel

from .hf import HFCLIPFamily
from .hf_base import EncoderLayout, HFEncoderFamily, LayerLayout, LogitHead, mean_pool_logits

LAYOUT = LayerLayout(norm1="layer_norm1", attn="self_attn", norm2="layer_norm2", mlp="mlp", post_attn=(),
                     post_mlp=(), out="out_proj", scale="scale", dropout="dropout")
"""CLIP's layer layout (SigLIP's layers are laid out the same)."""


class HFCLIP(HFEncoderFamily, HFCLIPFamily):
    """transformers CLIP vision tower."""
    layout = LAYOUT
    encoder_layout = EncoderLayout(blocks="encoder.layers", embed=("embeddings", "pre_layrnorm"),
                                   class_token="class_embedding")
    layer_classes = (CLIPEncoderLayer,)
    attention_classes = (CLIPAttention,)
    encoder_classes = (CLIPVisionModel,)
    logit_heads: ClassVar[dict[str, LogitHead]] = {"CLIPForImageClassification": mean_pool_logits}
    pooling_heads = tuple(logit_heads)


FAMILY = HFCLIP

__all__ = ["FAMILY", "HFCLIP", "LAYOUT"]

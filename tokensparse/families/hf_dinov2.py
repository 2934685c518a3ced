"""Hugging Face ``transformers`` DINOv2 (``Dinov2Model``, ``Dinov2ForImageClassification``,
``Dinov2WithRegistersModel``, ``Dinov2WithRegistersForImageClassification``).

Layers ``encoder.layer`` of ``norm1`` -> ``attention`` -> ``layer_scale1`` -> drop path,
``norm2`` -> ``mlp`` (plain or SwiGLU) -> ``layer_scale2`` -> drop path; final
``layernorm``. Registers are prefix tokens after the class token. The classifiers
concatenate the class token with the mean of the patch tokens: once tokens are merged (or
masked in DynamicViT training) that mean is weighted by token size, so a merged token
counts once per patch it holds. See ``hf_base.py``.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers.models.dinov2.modeling_dinov2 import Dinov2Attention, Dinov2Layer, Dinov2Model
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersAttention,
    Dinov2WithRegistersLayer,
    Dinov2WithRegistersModel,
)

from ..state import TokenState
from .hf import HFDinov2Family
from .hf_base import EncoderLayout, HFEncoderFamily, LayerLayout, LogitHead, pooled_mean


def dinov2_logits(model: nn.Module, tokens: Tensor, state: TokenState | None, num_prefix: int) -> Tensor:
    """``classifier([class token, mean of the patch tokens])``, the mean weighted by token size."""
    return model.classifier(torch.cat([tokens[:, 0], pooled_mean(tokens, state, num_prefix)], dim=1))


class HFDinov2(HFEncoderFamily, HFDinov2Family):
    """transformers DINOv2, with or without registers."""
    layout = LayerLayout(norm1="norm1", attn="attention", norm2="norm2", mlp="mlp",
                         post_attn=("layer_scale1", "drop_path"), post_mlp=("layer_scale2", "drop_path"))
    encoder_layout = EncoderLayout(blocks="encoder.layer", final_norm="layernorm", class_token="cls_token",
                                   extra_prefix=("register_tokens",))
    layer_classes = (Dinov2Layer, Dinov2WithRegistersLayer)
    attention_classes = (Dinov2Attention, Dinov2WithRegistersAttention)
    encoder_classes = (Dinov2Model, Dinov2WithRegistersModel)
    logit_heads: ClassVar[dict[str, LogitHead]] = {"Dinov2ForImageClassification": dinov2_logits,
                                                   "Dinov2WithRegistersForImageClassification": dinov2_logits}
    pooling_heads = tuple(logit_heads)


FAMILY = HFDinov2

__all__ = ["FAMILY", "HFDinov2", "dinov2_logits"]

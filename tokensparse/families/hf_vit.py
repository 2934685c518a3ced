"""Hugging Face ``transformers`` ViT and DeiT (``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``).

The two share one encoder layout (``layers`` of ``layernorm_before`` -> ``attention`` ->
dropout, ``layernorm_after`` -> ``mlp`` -> dropout; final ``layernorm``); DeiT adds a
distillation token after the class token (two prefix tokens). Every head reads prefix
tokens (class, distillation), so no head changes. See ``hf_base.py``.
"""
from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn
from transformers.models.deit.modeling_deit import DeiTAttention, DeiTLayer, DeiTModel
from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer, ViTModel

from ..state import TokenState
from .hf import HFViTFamily
from .hf_base import EncoderLayout, HFEncoderFamily, LayerLayout, LogitHead, class_token_logits


def teacher_logits(model: nn.Module, tokens: Tensor, state: TokenState | None, num_prefix: int) -> Tensor:
    """``DeiTForImageClassificationWithTeacher``: the mean of the class- and distillation-token heads."""
    return (model.cls_classifier(tokens[:, 0]) + model.distillation_classifier(tokens[:, 1])) / 2


class HFViT(HFEncoderFamily, HFViTFamily):
    """transformers ViT / DeiT."""
    layout = LayerLayout(norm1="layernorm_before", attn="attention", norm2="layernorm_after", mlp="mlp",
                         post_attn=("dropout",), post_mlp=("dropout",))
    encoder_layout = EncoderLayout(final_norm="layernorm", class_token="cls_token", extra_prefix=("distillation_token",))
    layer_classes = (ViTLayer, DeiTLayer)
    attention_classes = (ViTAttention, DeiTAttention)
    encoder_classes = (ViTModel, DeiTModel)
    logit_heads: ClassVar[dict[str, LogitHead]] = {
        "ViTForImageClassification": class_token_logits, "DeiTForImageClassification": class_token_logits,
        "DeiTForImageClassificationWithTeacher": teacher_logits}


FAMILY = HFViT

__all__ = ["FAMILY", "HFViT", "teacher_logits"]

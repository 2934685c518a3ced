"""Hugging Face ``transformers`` ViT and DeiT (``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``).

The two share one encoder layout (``layers`` of ``layernorm_before`` -> ``attention`` ->
dropout, ``layernorm_after`` -> ``mlp`` -> dropout; final ``layernorm``); DeiT adds a
distillation token after the class token (two prefix tokens). Every head reads prefix
tokens (class, distillation), so no head changes. See ``hf_base.py``.
"""
from __future__ import annotations

from transformers.models.deit.modeling_deit import DeiTAttention, DeiTLayer, DeiTModel
from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer, ViTModel

from .hf import HFViTFamily
from .hf_base import HFEncoderFamily, HFTokenAttention, HFTokenLayer, LayerLayout

LAYOUT = LayerLayout(norm1="layernorm_before", attn="attention", norm2="layernorm_after", mlp="mlp",
                     post_attn=("dropout",), post_mlp=("dropout",))


class ViTTokenAttention(HFTokenAttention):
    layout = LAYOUT


class ViTTokenLayer(HFTokenLayer):
    layout = LAYOUT


class HFViT(HFEncoderFamily, HFViTFamily):
    """transformers ViT / DeiT."""
    layer = ViTTokenLayer
    attention = ViTTokenAttention
    layer_classes = (ViTLayer, DeiTLayer)
    attention_classes = (ViTAttention, DeiTAttention)
    encoder_classes = (ViTModel, DeiTModel)
    blocks_path = "layers"
    final_norm = "layernorm"
    class_token = "cls_token"
    extra_prefix = ("distillation_token",)


FAMILY = HFViT

__all__ = ["FAMILY", "HFViT", "ViTTokenAttention", "ViTTokenLayer"]

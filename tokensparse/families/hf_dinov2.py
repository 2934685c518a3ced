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

from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.dinov2.modeling_dinov2 import Dinov2Attention, Dinov2Layer, Dinov2Model
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersAttention,
    Dinov2WithRegistersLayer,
    Dinov2WithRegistersModel,
)
from transformers.utils.generic import can_return_tuple

from .hf import HFDinov2Family
from .hf_base import HFEncoderFamily, HFTokenAttention, HFTokenLayer, HFTokenModel, LayerLayout, pooled_mean

LAYOUT = LayerLayout(norm1="norm1", attn="attention", norm2="norm2", mlp="mlp",
                     post_attn=("layer_scale1", "drop_path"), post_mlp=("layer_scale2", "drop_path"))


class Dinov2TokenAttention(HFTokenAttention):
    layout = LAYOUT


class Dinov2TokenLayer(HFTokenLayer):
    layout = LAYOUT


class Dinov2TokenClassifier(HFTokenModel):
    """``Dinov2(WithRegisters)ForImageClassification``: ``classifier([class token, mean of patch tokens])``,
    the mean weighted by token size."""

    def forward(self, pixel_values: Tensor | None = None, labels: Tensor | None = None,
                attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        return self.token_pass(self._classify, pixel_values, labels, attention_mask, **kwargs)

    @can_return_tuple
    def _classify(self, pixel_values: Tensor | None, labels: Tensor | None, attention_mask: Tensor | None,
                  **kwargs: Any) -> ImageClassifierOutput:
        outputs = self.ts_encoder()(pixel_values, attention_mask=attention_mask, **kwargs)
        tokens = outputs.last_hidden_state
        state = self.__dict__["_ts"].state
        logits = self.classifier(torch.cat([tokens[:, 0], pooled_mean(tokens, state, state.num_prefix)], dim=1))
        loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


class HFDinov2(HFEncoderFamily, HFDinov2Family):
    """transformers DINOv2, with or without registers."""
    layer = Dinov2TokenLayer
    attention = Dinov2TokenAttention
    layer_classes = (Dinov2Layer, Dinov2WithRegistersLayer)
    attention_classes = (Dinov2Attention, Dinov2WithRegistersAttention)
    encoder_classes = (Dinov2Model, Dinov2WithRegistersModel)
    blocks_path = "encoder.layer"
    final_norm = "layernorm"
    class_token = "cls_token"
    extra_prefix = ("register_tokens",)
    heads: ClassVar[dict[str, type[HFTokenModel]]] = {"Dinov2ForImageClassification": Dinov2TokenClassifier,
             "Dinov2WithRegistersForImageClassification": Dinov2TokenClassifier}


FAMILY = HFDinov2

__all__ = ["FAMILY", "Dinov2TokenAttention", "Dinov2TokenClassifier", "Dinov2TokenLayer", "HFDinov2"]

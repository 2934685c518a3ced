"""Hugging Face ``transformers`` CLIP vision towers (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``,
``CLIPForImageClassification``; a ``CLIPModel``'s ``vision_model`` is a ``CLIPVisionModel``).

Embeddings, then ``pre_layrnorm``, then ``encoder.layers`` of ``layer_norm1`` ->
``self_attn``, ``layer_norm2`` -> ``mlp``. ``last_hidden_state`` is the last layer's output
(no final norm); the pooled output is ``post_layernorm`` of the class token, so it needs no
change. ``CLIPForImageClassification`` averages the patch tokens: weighted by token size
once tokens are merged. See ``hf_base.py``.
"""
from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer, CLIPVisionModel
from transformers.utils.generic import can_return_tuple

from .hf import HFCLIPFamily
from .hf_base import HFEncoderFamily, HFTokenAttention, HFTokenLayer, HFTokenModel, LayerLayout, pooled_mean

LAYOUT = LayerLayout(norm1="layer_norm1", attn="self_attn", norm2="layer_norm2", mlp="mlp", post_attn=(),
                     post_mlp=(), out="out_proj", scale="scale", dropout="dropout")


class CLIPTokenAttention(HFTokenAttention):
    layout = LAYOUT


class CLIPTokenLayer(HFTokenLayer):
    layout = LAYOUT


class MeanPoolClassifier(HFTokenModel):
    """A transformers classifier on the mean of the tokens after the prefix (``vision_model`` then
    ``classifier``), the mean weighted by token size: CLIP's and SigLIP's ``...ForImageClassification``."""

    def forward(self, pixel_values: Tensor | None = None, labels: Tensor | None = None, **kwargs: Any) -> Any:
        return self.token_pass(self._classify, pixel_values, labels, **kwargs)

    @can_return_tuple
    def _classify(self, pixel_values: Tensor | None, labels: Tensor | None, **kwargs: Any) -> ImageClassifierOutput:
        outputs = self.ts_encoder()(pixel_values, **kwargs)
        state = self.__dict__["_ts"].state
        logits = self.classifier(pooled_mean(outputs.last_hidden_state, state, state.num_prefix))
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


class HFCLIP(HFEncoderFamily, HFCLIPFamily):
    """transformers CLIP vision tower."""
    layer = CLIPTokenLayer
    attention = CLIPTokenAttention
    layer_classes = (CLIPEncoderLayer,)
    attention_classes = (CLIPAttention,)
    encoder_classes = (CLIPVisionModel,)
    embed = ("embeddings", "pre_layrnorm")
    blocks_path = "encoder.layers"
    final_norm = None
    class_token = "class_embedding"
    heads: ClassVar[dict[str, type[HFTokenModel]]] = {"CLIPForImageClassification": MeanPoolClassifier}


FAMILY = HFCLIP

__all__ = ["FAMILY", "HFCLIP", "CLIPTokenAttention", "CLIPTokenLayer", "MeanPoolClassifier"]

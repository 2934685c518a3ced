"""Convert a timm ``VisionTransformer`` classifier into a Hugging Face ``ViTForImageClassification``.

For users who have timm weights and want the transformers model (and for the tests, which
check the transformers families against timm on the same real weights). The mapping is
the plain ViT: class token, learned position embedding, pre-norm blocks with a fused
``qkv`` (split into ``q_proj`` / ``k_proj`` / ``v_proj``), exact GELU, final norm, linear
head on the class token. Anything else (registers, distillation token, layer scale, q/k
norm, average pooling, ...) is refused with a clear error rather than converted wrongly.

    hf = vit_from_timm(timm_model)                        # same weights, same predictions
    hf.save_pretrained("vit-hf")                          # ViTForImageClassification.from_pretrained
    image_processor_from_timm(timm_model).save_pretrained("vit-hf")  # its preprocessing, for hf:vit-hf

:func:`image_processor_from_timm` gives the timm model's preprocessing (resize, centre crop,
mean and std of ``timm.data.resolve_data_config``) as a transformers ``BitImageProcessor``.
"""
from __future__ import annotations

import math

import timm.data
import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn
from transformers import BitImageProcessor, ViTConfig, ViTForImageClassification

from ..errors import TokenSparseError


def _refuse(what: str) -> TokenSparseError:
    return TokenSparseError(f"cannot convert this timm model to a transformers ViTForImageClassification: {what}; "
                            f"supported: plain ViT / DeiT (class token, token pooling, no registers)")


def _check(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise _refuse(f"it is a {type(model).__name__}, not a timm VisionTransformer")
    if model.cls_token is None or model.num_prefix_tokens != 1:
        raise _refuse(f"it has {model.num_prefix_tokens} prefix tokens (one class token needed)")
    if model.global_pool != "token" or model.attn_pool is not None:
        raise _refuse(f"global_pool={model.global_pool!r} (token pooling needed)")
    if model.no_embed_class or model.dynamic_img_size or model.pos_embed is None:
        raise _refuse("its position embedding is not a plain learned one over class token and patches")
    plain = (model.fc_norm, model.norm_pre, model.patch_drop, model.patch_embed.norm)
    if not all(isinstance(m, nn.Identity) for m in plain):
        raise _refuse("it has fc_norm, norm_pre, patch dropout or a patch-embedding norm")
    if not isinstance(model.norm, nn.LayerNorm):
        raise _refuse(f"its final norm is a {type(model.norm).__name__}")
    for i, blk in enumerate(model.blocks):
        ok = (type(blk) is Block and type(blk.attn) is Attention and type(blk.mlp) is Mlp
              and isinstance(blk.norm1, nn.LayerNorm) and isinstance(blk.norm2, nn.LayerNorm)
              and all(isinstance(m, nn.Identity) for m in (blk.ls1, blk.ls2, blk.attn.q_norm, blk.attn.k_norm,
                                                             blk.attn.norm, blk.mlp.norm))
              and getattr(blk.attn, "gate", None) is None
              and isinstance(blk.mlp.act, nn.GELU) and blk.mlp.act.approximate == "none"
              and blk.mlp.fc1.bias is not None and blk.attn.proj.bias is not None
              and blk.norm1.eps == model.norm.eps)
        if not ok:
            raise _refuse(f"block {i} is not a plain pre-norm block (layer scale, q/k norm, gated or non-GELU MLP)")


def vit_config_from_timm(model: VisionTransformer) -> ViTConfig:
    """The ``ViTConfig`` of a timm ViT classifier (checked convertible)."""
    _check(model)
    blk = model.blocks[0]
    h, w = model.patch_embed.img_size
    ph, pw = model.patch_embed.patch_size
    if h != w or ph != pw:
        raise _refuse(f"image size {h}x{w} / patch {ph}x{pw} is not square")
    head = model.head
    return ViTConfig(
        hidden_size=model.embed_dim, num_hidden_layers=len(model.blocks), num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=model.norm.eps, image_size=h, patch_size=ph,
        num_channels=model.patch_embed.proj.in_channels, qkv_bias=blk.attn.qkv.bias is not None,
        num_labels=head.out_features if isinstance(head, nn.Linear) else 0, attn_implementation="sdpa")


def vit_state_dict_from_timm(model: VisionTransformer) -> dict[str, Tensor]:
    """The timm ViT's weights under ``ViTForImageClassification`` names (tensors copied)."""
    _check(model)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    C = model.embed_dim
    out = {
        "vit.embeddings.cls_token": sd.pop("cls_token"),
        "vit.embeddings.position_embeddings": sd.pop("pos_embed"),
        "vit.embeddings.patch_embeddings.projection.weight": sd.pop("patch_embed.proj.weight"),
        "vit.embeddings.patch_embeddings.projection.bias": sd.pop("patch_embed.proj.bias"),
        "vit.layernorm.weight": sd.pop("norm.weight"),
        "vit.layernorm.bias": sd.pop("norm.bias"),
    }
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(len(model.blocks)):
        src, dst = f"blocks.{i}.", f"vit.layers.{i}."
        for t, h in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{h}.{p}"] = sd.pop(f"{src}{t}.{p}")
        for p in ("weight", "bias"):
            qkv = sd.pop(f"{src}attn.qkv.{p}", None)
            if qkv is not None:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), qkv.split(C)):
                    out[f"{dst}attention.{name}.{p}"] = part.clone()
    if isinstance(model.head, nn.Linear):
        out["classifier.weight"], out["classifier.bias"] = sd.pop("head.weight"), sd.pop("head.bias")
    if sd:
        raise _refuse(f"weights without a transformers counterpart: {', '.join(sorted(sd))}")
    return out


def vit_from_timm(model: VisionTransformer) -> ViTForImageClassification:
    """A ``ViTForImageClassification`` (eval mode, SDPA attention) with the timm ViT's weights."""
    config = vit_config_from_timm(model)
    hf = ViTForImageClassification(config)
    missing, unexpected = hf.load_state_dict(vit_state_dict_from_timm(model), strict=False)
    if missing or unexpected:  # a transformers whose ViT names its weights differently
        raise TokenSparseError(f"transformers' ViTForImageClassification does not take the converted weights "
                               f"(missing {missing}, unexpected {unexpected})")
    ref = next(model.parameters())
    return hf.to(ref.device, ref.dtype).eval()


def image_processor_from_timm(model: nn.Module) -> BitImageProcessor:
    """The timm model's eval preprocessing as an image processor: bicubic (or the model's
    interpolation) resize of the shortest edge to ``floor(size / crop_pct)``, centre crop, 1/255,
    the model's mean and std. Square inputs and timm's ``center`` crop mode only."""
    cfg = timm.data.resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    if h != w or cfg.get("crop_mode", "center") != "center":
        raise TokenSparseError(f"cannot express this timm preprocessing as an image processor: input {h}x{w}, "
                               f"crop_mode {cfg.get('crop_mode')!r} (square input and centre crop needed)")
    resample = {"nearest": 0, "bilinear": 2, "bicubic": 3}.get(cfg["interpolation"])
    if resample is None:
        raise TokenSparseError(f"cannot express interpolation {cfg['interpolation']!r} as an image processor's")
    edge = math.floor(h / cfg["crop_pct"])
    return BitImageProcessor(do_resize=True, size={"shortest_edge": edge}, resample=resample, do_center_crop=True,
                             crop_size={"height": h, "width": w}, do_rescale=True, rescale_factor=1 / 255,
                             do_normalize=True, image_mean=list(cfg["mean"]), image_std=list(cfg["std"]),
                             do_convert_rgb=True)


@torch.no_grad()
def max_logit_difference(timm_model: VisionTransformer, hf_model: ViTForImageClassification, x: Tensor) -> float:
    """Largest absolute difference between the two models' logits on ``x`` (a conversion check)."""
    return float((timm_model(x) - hf_model(pixel_values=x).logits).abs().max())


__all__ = ["image_processor_from_timm", "max_logit_difference", "vit_config_from_timm", "vit_from_timm", "vit_state_dict_from_timm"]

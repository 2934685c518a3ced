"""Patches for timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, register-token ViTs).

Thin class swaps in the style of ToMe: the model, its blocks and their attention modules get
subclasses that add a reduction step after attention. Weights and submodules stay timm's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from timm.models.vision_transformer import Attention, Block, VisionTransformer

from ..errors import TokenSparseError
from ..ops import class_attention
from ..state import TokenState
from .base import swap_class


@dataclass
class AttentionExtras:
    """By-products of attention that reducers score tokens with (None when not asked for).

    ``cls_attn``: ``(B, H, N)`` class-token attention row; ``keys``: ``(B, N, D)`` keys
    averaged over heads; ``value_norm``: ``(B, N)`` L2 norm of each token's value vector.
    """
    cls_attn: Optional[Tensor] = None
    keys: Optional[Tensor] = None
    value_norm: Optional[Tensor] = None


class TokenReducer(nn.Module):
    """A reduction step run inside a block after its attention residual.

    ``needs`` names the :class:`AttentionExtras` fields it uses. ``forward`` returns the
    reduced tokens and updates/records the :class:`TokenState`.
    """
    needs: frozenset[str] = frozenset()

    def forward(self, x: Tensor, extras: AttentionExtras, state: TokenState, block: int) -> Tensor:
        raise NotImplementedError


class ReducedAttention(Attention):
    """timm ``Attention`` that can add a logit bias and return scoring by-products."""

    def forward_extras(
            self, x: Tensor, bias: Optional[Tensor] = None, needs: frozenset[str] = frozenset(),
    ) -> tuple[Tensor, AttentionExtras]:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            mask = None if bias is None else bias.to(q.dtype)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            out = self.attn_drop(attn.softmax(dim=-1)) @ v
        out = out.transpose(1, 2).reshape(B, N, -1)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        out = self.proj_drop(self.proj(out))
        extras = AttentionExtras(
            cls_attn=class_attention(q, k, self.scale, bias) if "cls_attn" in needs else None,
            keys=k.mean(dim=1) if "keys" in needs else None,
            value_norm=v.transpose(1, 2).reshape(B, N, -1).norm(dim=-1) if "value_norm" in needs else None,
        )
        return out, extras


class ReducedBlock(Block):
    """timm ``Block`` with an optional :class:`TokenReducer` between attention and MLP."""
    _ts_state: TokenState
    _ts_index: int

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise TokenSparseError("token reduction does not support attention masks or causal attention")
        state = self._ts_state
        state.ensure_started(x)
        reducer: Optional[TokenReducer] = getattr(self, "ts_reducer", None)
        needs = reducer.needs if reducer is not None else frozenset()
        y, extras = self.attn.forward_extras(self.norm1(x), state.attn_bias(), needs)
        x = x + self.drop_path1(self.ls1(y))
        if reducer is not None:
            x = reducer(x, extras, state, self._ts_index)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ReducedVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` that starts and ends the token bookkeeping of a pass."""
    _ts_state: TokenState

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        self._ts_state.finish()
        try:
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        finally:
            self._ts_state.finish()

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        """Average pooling weights merged tokens by their size; other pools are timm's."""
        pool_type = self.global_pool if pool_type is None else pool_type
        size = self._ts_state.size
        if self.attn_pool is None and pool_type == "avg" and size is not None and not self.pool_include_prefix:
            p = self.num_prefix_tokens
            w = size[:, p:]
            return (x[:, p:] * w).sum(dim=1) / w.sum(dim=1)
        return super().pool(x, pool_type)


def check_vit(model: nn.Module, needs_class_token: bool, method: str) -> None:
    """Raise a clear error if ``model`` is a ViT this package cannot patch."""
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk, Block) or not isinstance(blk.attn, Attention):
            raise TokenSparseError(
                f"block {i} of this VisionTransformer is a {type(blk).__name__} with "
                f"{type(getattr(blk, 'attn', None)).__name__} attention; supported: timm Block with "
                f"Attention (ViT, DeiT, AugReg, register-token ViTs)")
    if needs_class_token and not getattr(model, "has_class_token", False):
        raise TokenSparseError(
            f"method '{method}' scores tokens by class attention, but this model has no class token")
    if getattr(model, "grad_checkpointing", False):
        raise TokenSparseError("disable gradient checkpointing (model.set_grad_checkpointing(False)) before patching")


def install(model: VisionTransformer, reducers: dict[int, nn.Module], prop_attn: bool = False,
            state: Optional[TokenState] = None, model_cls: Optional[type] = None,
            block_cls: Optional[type] = None) -> TokenState:
    """Swap classes on ``model`` and put ``reducers[i]`` in block ``i``. Returns the shared state.

    ``state``, ``model_cls`` and ``block_cls`` default to :class:`TokenState`,
    :class:`ReducedVisionTransformer` and :class:`ReducedBlock`; methods with their own pass
    (DynamicViT) give subclasses.
    """
    state = state or TokenState(num_prefix=model.num_prefix_tokens, prop_attn=prop_attn)
    swap_class(model, model_cls or ReducedVisionTransformer)
    model._ts_state = state
    for i, blk in enumerate(model.blocks):
        swap_class(blk, block_cls or ReducedBlock)
        swap_class(blk.attn, ReducedAttention)
        blk._ts_state = state
        blk._ts_index = i
        if i in reducers:
            blk.ts_reducer = reducers[i]
    return state


def uninstall(model: VisionTransformer) -> None:
    """Undo :func:`install`."""
    for blk in model.blocks:
        if hasattr(blk, "ts_reducer"):
            del blk.ts_reducer
        for attr in ("_ts_state", "_ts_index"):
            blk.__dict__.pop(attr, None)
    model.__dict__.pop("_ts_state", None)


# ----------------------------------------------------------------------------- running part of a model

def feature_tokens(features: Tensor) -> Tensor:
    """A ViT's ``forward_features`` output already is ``(B, N, C)`` tokens."""
    return features


def run_to(model: VisionTransformer, x: Tensor, start: int) -> Tensor:
    """The tokens entering block ``start`` (patch + position embedding, pre-norm, blocks before)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for blk in model.blocks[:start]:
        x = blk(x)
    return x


def features_from(model: VisionTransformer, h: Tensor, start: int) -> Tensor:
    """``forward_features`` from the tokens ``h`` entering block ``start`` (records the pass)."""
    state = model.__dict__.get("_ts_state")
    if state is not None:
        state.finish()
    try:
        for blk in model.blocks[start:]:
            h = blk(h)
        return model.norm(h)
    finally:
        if state is not None:
            state.finish()

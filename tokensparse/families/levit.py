"""timm LeViT (``levit_*`` and ``levit_conv_*``) run on variable sets of tokens.

LeViT has no class token, a 4-stride-2 convolutional stem, BatchNorm'd linear (or 1x1
convolution) layers, and attention with learned biases indexed by the relative position of
query and key on the stage's grid. To run a stage on a subset of its tokens (plus a class
token or a representative token, which have no grid position) these functions work on
tokens ``(B, n, C)`` in both variants and take the attention bias as an argument: the
bias of two grid tokens is the model's own (gathered for the tokens present, as
``TokenState.grid_positions`` says), and a token without a position gets a bias of zero.

Attention is computed the way timm's LeViT computes it (``q @ k * scale + bias``, softmax,
``@ v``), not through ``scaled_dot_product_attention``: LeViT's sequences are short (at most
196 tokens, key dim 16-32), the fused CPU kernel measured no faster here (levit_256, batch 32),
and its different summation order drifts by ~1e-4 through twelve BatchNorm'd blocks, while
timm's order keeps a model with nothing reduced equal to timm's, bit for bit.

Every stage's downsampling sees the complete grid (a method must restore it by the end of a
stage: this family is not ``reducible``); prefix tokens (a class token added with
:meth:`LevitFamily.add_class_token`) query for themselves, so they are carried through.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

import torch
from timm.models.levit import (
    Attention,
    AttentionDownsample,
    ConvNorm,
    Downsample,
    Levit,
    LevitBlock,
    LevitDownsample,
    LevitMlp,
    LevitStage,
)
from torch import Tensor, nn

from ..errors import TokenSparseError
from ..ops import class_attention, gather_bias, pad_bias
from ..state import TokenState
from .base import HOOK, AttentionExtras, BlockHook, TokenFamily, attach, swap_class
from .vit import checkpointing_error

CLS_TOKEN = "ts_cls_token"


def token_layer(layer: nn.Module, x: Tensor) -> Tensor:
    """A LeViT ``LinearNorm`` or ``ConvNorm`` (1x1 convolution + BatchNorm) on tokens ``(B, n, C)``."""
    if isinstance(layer, ConvNorm):
        return layer(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
    return layer(x)


def mlp_tokens(mlp: LevitMlp, x: Tensor) -> Tensor:
    """A ``LevitMlp`` on tokens ``(B, n, C)``."""
    return token_layer(mlp.ln2, mlp.drop(mlp.act(token_layer(mlp.ln1, x))))


def timm_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """``softmax(q @ k^T * scale + bias) @ v`` in timm LeViT's order of operations."""
    attn = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        attn = attn + bias
    return attn.softmax(dim=-1) @ v


def class_rows(q: Tensor, k: Tensor, scale: float, bias: Tensor | None, needs: frozenset[str],
               num_prefix: int = 0) -> AttentionExtras:
    """``cls_attn`` (first query) and ``mean_attn`` (mean of the queries after the prefix) rows, per head,
    over the keys after ``num_prefix`` prefix keys."""
    P = num_prefix
    first = class_attention(q, k, scale, bias)[..., P:] if "cls_attn" in needs else None
    mean = None
    if "mean_attn" in needs:
        mean = class_attention(q[:, :, P:], k, scale, None if bias is None else bias[..., P:, :], "mean")[..., P:]
    return AttentionExtras(cls_attn=first, mean_attn=mean)


def attention_tokens(attn: Attention, x: Tensor, bias: Tensor | None,
                     needs: frozenset[str] = frozenset()) -> tuple[Tensor, AttentionExtras]:
    """A LeViT ``Attention`` on tokens ``(B, n, C)`` with ``bias`` broadcastable to ``(B, H, n, n)``.

    Returns the output ``(B, n, C)`` and the class-attention rows named in ``needs`` over all
    ``n`` keys.
    """
    B, n, _ = x.shape
    qkv = token_layer(attn.qkv, x).view(B, n, attn.num_heads, -1)
    q, k, v = (t.transpose(1, 2) for t in qkv.split([attn.key_dim, attn.key_dim, attn.val_dim], dim=3))
    out = timm_attention(q, k, v, attn.scale, bias)
    out = token_layer(attn.proj.ln, attn.proj.act(out.transpose(1, 2).reshape(B, n, attn.val_attn_dim)))
    return out, class_rows(q, k, attn.scale, bias, needs)


def subsample(t: Tensor, resolution: tuple[int, int], stride: int) -> Tensor:
    """Every ``stride``-th row and column of grid values ``t`` ``(B, H*W, ...)``."""
    B = t.shape[0]
    return t.reshape(B, resolution[0], resolution[1], *t.shape[2:])[:, ::stride, ::stride].reshape(
        B, -1, *t.shape[2:])


def downsample_tokens(ds: LevitDownsample, x: Tensor, num_prefix: int,
                      needs: frozenset[str] = frozenset()) -> tuple[Tensor, AttentionExtras]:
    """A ``LevitDownsample`` on the full grid ``x[:, P:]`` with ``P`` prefix (class) tokens in front.

    Queries are the subsampled grid, and each prefix token queries for itself, so a class
    token is carried into the next stage. Returns the new tokens ``(B, P + N_q, C_out)`` and
    the class-attention rows named in ``needs`` over the ``N_k`` grid keys.
    """
    ad: AttentionDownsample = ds.attn_downsample
    P = num_prefix
    B, n, _ = x.shape
    kv = token_layer(ad.kv, x).view(B, n, ad.num_heads, -1)
    k, v = (t.transpose(1, 2) for t in kv.split([ad.key_dim, ad.val_dim], dim=3))
    grid = subsample(x[:, P:], ad.resolution, ad.stride)
    q = token_layer(ad.q.ln, torch.cat([x[:, :P], grid], dim=1))
    m = q.shape[1]
    q = q.view(B, m, ad.num_heads, ad.key_dim).transpose(1, 2)
    bias = pad_bias(ad.get_attention_biases(x.device), P, 0)  # prefix queries and keys: no position
    out = timm_attention(q, k, v, ad.scale, bias)
    out = token_layer(ad.proj.ln, ad.proj.act(out.transpose(1, 2).reshape(B, m, ad.val_attn_dim)))
    out = out + ds.drop_path(mlp_tokens(ds.mlp, out))
    return out, class_rows(q, k, ad.scale, bias, needs, P)


def stage_grid(stage: LevitStage) -> tuple[int, int]:
    """``(H, W)`` of the tokens inside a stage (after its downsampling)."""
    res = stage.blocks[0].attn.resolution if len(stage.blocks) else (0, 0)
    return int(res[0]), int(res[1])


def stem_tokens(model: Levit, x: Tensor) -> Tensor:
    """The stem's output as tokens ``(B, N, C)`` (both variants)."""
    return model.stem(x).flatten(2).transpose(1, 2)


def layout_bias(bias: Tensor, state: TokenState) -> Tensor:
    """A block's grid bias ``(H, N, N)`` for the current tokens: ``[prefix, grid tokens, trailing]``."""
    if state.grid_positions is None:
        return pad_bias(bias, state.num_prefix, 0)
    return pad_bias(gather_bias(bias, state.grid_positions), state.num_prefix, state.trailing)


class TokenLevitStage(LevitStage):
    """timm ``LevitStage`` on tokens ``(B, P + N, C)``: downsampling (carrying prefix tokens), then
    its blocks with their hook points, attention biases following the token layout."""

    def forward(self, x: Tensor) -> Tensor:
        s = self.__dict__["_ts"]
        state: TokenState = s.state
        P = state.num_prefix
        if isinstance(self.downsample, LevitDownsample):
            ad = self.downsample.attn_downsample
            x, extras = downsample_tokens(self.downsample, x, P, state.downsample_needs)
            state.on_downsample(extras, partial(subsample, resolution=ad.resolution, stride=ad.stride))
        state.stage, state.grid = s.index, s.config["grid"]
        for i, blk in enumerate(self.blocks):
            hook: BlockHook | None = blk._modules.get(HOOK)
            needs = frozenset() if hook is None else hook.needs
            if hook is not None:
                x = hook.before(x, state, i)
            y, extras = attention_tokens(blk.attn, x, layout_bias(blk.attn.get_attention_biases(x.device), state),
                                         needs)
            x = x + blk.drop_path1(y)
            if hook is not None:
                x = hook.after_attn(x, extras, state, i)
            x = x + blk.drop_path2(mlp_tokens(blk.mlp, x))
            if hook is not None:
                x = hook.after(x, state, i)
        return x


class TokenLevit(Levit):
    """timm ``Levit`` running its stages on tokens, with an optional new class token in front.

    ``forward_features`` returns tokens ``(B, P + N, C)`` in both LeViT variants;
    ``forward_head`` classifies (``TokenState.pool``) the mean of the patch tokens (``model``,
    ``mean``: LeViT's own head), the class token (``token``), or both (``both``: logits
    averaged), through the model's own head(s).
    """

    def forward_features(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing:
            raise checkpointing_error(self)
        state: TokenState = self.__dict__["_ts"].state
        x = stem_tokens(self, x)
        expected = stage_grid(self.stages[0])
        if x.shape[1] != expected[0] * expected[1]:
            raise TokenSparseError(
                f"this LeViT was built for a {expected[0]}x{expected[1]} token grid ({expected[0] * 16} px images: "
                f"timm.create_model(..., img_size=...) sets it); the input gives {x.shape[1]} tokens")
        cls_token = self._parameters.get(CLS_TOKEN)
        if cls_token is not None:
            x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        state.start(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Refused while patched (:func:`~tokensparse.families.vit.checkpointing_error`); disabling is allowed."""
        if enable:
            raise checkpointing_error(self)
        super().set_grad_checkpointing(False)

    def forward(self, x: Tensor) -> Any:
        try:
            return self.forward_head(self.forward_features(x))
        finally:
            self.__dict__["_ts"].state.finish()

    def _head(self, v: Tensor, pre_logits: bool) -> Any:
        """timm's own head on pooled features ``v`` ``(B, C)``."""
        shaped = v.view(v.shape[0], -1, 1, 1) if self.use_conv else v.unsqueeze(1)
        return super().forward_head(shaped, pre_logits=pre_logits)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Any:
        state: TokenState = self.__dict__["_ts"].state
        P, pool = state.num_prefix, state.pool or "model"
        if pool == "token":
            return self._head(x[:, 0], pre_logits)
        mean = self._head(x[:, P:].mean(dim=1), pre_logits)
        if pool != "both":
            return mean
        token = self._head(x[:, 0], pre_logits)
        if isinstance(mean, tuple):
            return tuple((a + b) / 2 for a, b in zip(mean, token))
        return (mean + token) / 2

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        raise TokenSparseError("forward_intermediates is not available on a patched LeViT "
                               "(its stages run on token sequences); use forward_features")


class LevitFamily(TokenFamily):
    """timm ``Levit``: three stages of attention blocks with relative-position biases, no class token."""
    name: ClassVar[str] = "levit"
    model_classes: ClassVar[tuple[type, ...]] = (Levit,)
    description: ClassVar[str] = "timm Levit (levit_* and levit_conv_*)"
    reducible: ClassVar[bool] = False
    pools: ClassVar[tuple[str, ...]] = ("model", "mean", "token", "both")
    can_add_class_token: ClassVar[bool] = True

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return [blk for stage in self.model.stages for blk in stage.blocks]

    @property
    def stage_depths(self) -> list[int]:
        return [len(stage.blocks) for stage in self.model.stages]

    @property
    def num_prefix(self) -> int:
        return 1 if CLS_TOKEN in self.model._parameters else 0

    @property
    def has_class_token(self) -> bool:
        return False

    def check(self, method: str) -> None:
        model = self.model
        if model.global_pool != "avg":
            raise TokenSparseError(f"method '{method}' needs LeViT's average pooling head, got global_pool="
                                   f"{model.global_pool!r}")
        if getattr(model, "grad_checkpointing", False):
            raise TokenSparseError("disable gradient checkpointing (model.set_grad_checkpointing(False)) before patching")
        for s, stage in enumerate(model.stages):
            ok = isinstance(stage, LevitStage) and isinstance(stage.downsample, (nn.Identity, LevitDownsample)) and \
                all(isinstance(b, LevitBlock) for b in stage.blocks)
            if ok and isinstance(stage.downsample, LevitDownsample):
                down = stage.downsample.attn_downsample.q.down
                ok = isinstance(down, (Downsample, nn.AvgPool2d)) and \
                    getattr(down, "kernel_size", 1) in (1, (1, 1)) and getattr(down, "pool", None) is None
            if not ok:
                raise TokenSparseError(
                    f"method '{method}': stage {s} of this LeViT is not made of timm's LevitBlock / LevitDownsample "
                    f"with strided subsampling; supported: timm levit_* and levit_conv_* models")

    def install(self, state: TokenState, hooks: dict[int, BlockHook]) -> None:
        swap_class(self.model, TokenLevit, state)
        offset = 0
        for s, stage in enumerate(self.model.stages):
            slot_ = swap_class(stage, TokenLevitStage, state, s)
            slot_.config["grid"] = stage_grid(stage)
            for i, blk in enumerate(stage.blocks):
                if offset + i in hooks:
                    attach(blk, HOOK, hooks[offset + i])
            offset += len(stage.blocks)

    def add_class_token(self) -> nn.Parameter:
        ref = next(self.model.parameters())
        token = nn.Parameter(torch.zeros(1, 1, self.model.embed_dim[0], device=ref.device, dtype=ref.dtype))
        nn.init.trunc_normal_(token, std=0.02)
        attach(self.model, CLS_TOKEN, token)
        return token

    def _no_calibration(self) -> TokenSparseError:
        return TokenSparseError("running part of a LeViT (calibration) is not supported; no learned method "
                                "here runs on LeViT")

    def run_to(self, x: Tensor, start: int) -> Tensor:
        raise self._no_calibration()

    def features_from(self, h: Tensor, start: int) -> Tensor:
        raise self._no_calibration()

    def feature_tokens(self, features: Tensor) -> Tensor:
        return features.flatten(2).transpose(1, 2) if features.ndim == 4 else features

    def patch_grid(self) -> tuple[int, int]:
        return stage_grid(self.model.stages[0])

"""timm LeViT (``levit_*`` and ``levit_conv_*``) run on variable sets of tokens.

LeViT has no class token, a 4-stride-2 convolutional stem, BatchNorm'd linear (or 1x1
convolution) layers, and attention with learned biases indexed by the relative position of
query and key on the stage's grid. To run a stage on a subset of its tokens (plus a class
token or a representative token, which have no grid position) these functions work on
tokens ``(B, n, C)`` in both variants and take the attention bias as an argument: the
bias of two grid tokens is the model's own (gathered for the tokens present), and a token
without a position gets a bias of zero.

Attention is computed the way timm's LeViT computes it (``q @ k * scale + bias``, softmax,
``@ v``), not through ``scaled_dot_product_attention``: LeViT's sequences are short (at most
196 tokens, key dim 16-32), the fused CPU kernel measured no faster here (levit_256, batch 32),
and its different summation order drifts by ~1e-4 through twelve BatchNorm'd blocks, while
timm's order keeps a model with nothing reduced equal to timm's, bit for bit.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm.models.levit import (Attention, AttentionDownsample, ConvNorm, Downsample, Levit, LevitBlock,
                               LevitDownsample, LevitMlp, LevitStage)

from ..errors import TokenSparseError


def check_levit(model: nn.Module, method: str) -> None:
    """Raise a clear error unless ``model`` is a timm LeViT this package can run on token subsets."""
    if not isinstance(model, Levit):
        raise TokenSparseError(f"method '{method}' expects a timm Levit, got {type(model).__name__}")
    if model.global_pool != "avg":
        raise TokenSparseError(f"method '{method}' needs LeViT's average pooling head, got global_pool="
                               f"{model.global_pool!r}")
    if getattr(model, "grad_checkpointing", False):
        raise TokenSparseError("disable gradient checkpointing (model.set_grad_checkpointing(False)) before patching")
    for s, stage in enumerate(model.stages):
        ok = isinstance(stage, LevitStage) and isinstance(stage.downsample, (nn.Identity, LevitDownsample)) and \
            all(isinstance(b, LevitBlock) for b in stage.blocks)
        if ok and isinstance(stage.downsample, LevitDownsample):
            ok = isinstance(stage.downsample.attn_downsample.q.down, (Downsample, nn.AvgPool2d)) and \
                getattr(stage.downsample.attn_downsample.q.down, "kernel_size", 1) in (1, (1, 1)) and \
                getattr(stage.downsample.attn_downsample.q.down, "pool", None) is None
        if not ok:
            raise TokenSparseError(
                f"method '{method}': stage {s} of this LeViT is not made of timm's LevitBlock / LevitDownsample "
                f"with strided subsampling; supported: timm levit_* and levit_conv_* models")


def token_layer(layer: nn.Module, x: Tensor) -> Tensor:
    """A LeViT ``LinearNorm`` or ``ConvNorm`` (1x1 convolution + BatchNorm) on tokens ``(B, n, C)``."""
    if isinstance(layer, ConvNorm):
        return layer(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
    return layer(x)


def mlp_tokens(mlp: LevitMlp, x: Tensor) -> Tensor:
    """A ``LevitMlp`` on tokens ``(B, n, C)``."""
    return token_layer(mlp.ln2, mlp.drop(mlp.act(token_layer(mlp.ln1, x))))


def pad_bias(bias: Tensor, before: int, after: int) -> Tensor:
    """Zero rows and columns for ``before`` leading and ``after`` trailing tokens without a position."""
    if before == 0 and after == 0:
        return bias
    return F.pad(bias, (before, after, before, after))


def gather_bias(bias: Tensor, positions: Tensor) -> Tensor:
    """``(B, H, k, k)`` attention bias among the grid ``positions`` ``(B, k)`` from ``bias`` ``(H, N, N)``."""
    B, k = positions.shape
    H, N, _ = bias.shape
    rows = bias.unsqueeze(0).expand(B, H, N, N).gather(2, positions.view(B, 1, k, 1).expand(B, H, k, N))
    return rows.gather(3, positions.view(B, 1, 1, k).expand(B, H, k, k))


def class_row(q: Tensor, k: Tensor, scale: float, bias: Optional[Tensor], query: str) -> Tensor:
    """Class-attention row ``(B, n)`` summed over heads: of the first query, or of the mean query.

    ``q`` ``(B, H, m, D)``, ``k`` ``(B, H, n, D)``, ``bias`` broadcastable to ``(B, H, m, n)``.
    The mean query's logits are the mean of the queries' logits (its bias the mean bias row).
    """
    if query == "first":
        qc = q[:, :, :1]
        b = None if bias is None else bias[..., :1, :]
    else:
        qc = q.mean(dim=2, keepdim=True)
        b = None if bias is None else bias.mean(dim=-2, keepdim=True)
    logits = (qc.float() * scale) @ k.float().transpose(-2, -1)
    if b is not None:
        logits = logits + b.float()
    return logits.softmax(dim=-1).squeeze(2).sum(dim=1).to(q.dtype)


def timm_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Optional[Tensor]) -> Tensor:
    """``softmax(q @ k^T * scale + bias) @ v`` in timm LeViT's order of operations."""
    attn = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        attn = attn + bias
    return attn.softmax(dim=-1) @ v


def attention_tokens(attn: Attention, x: Tensor, bias: Optional[Tensor],
                     query: Optional[str] = None) -> tuple[Tensor, Optional[Tensor]]:
    """A LeViT ``Attention`` on tokens ``(B, n, C)`` with ``bias`` broadcastable to ``(B, H, n, n)``.

    Returns the output ``(B, n, C)`` and, if ``query`` is given, the class-attention row over
    all ``n`` keys (see :func:`class_row`).
    """
    B, n, _ = x.shape
    qkv = token_layer(attn.qkv, x).view(B, n, attn.num_heads, -1)
    q, k, v = (t.transpose(1, 2) for t in qkv.split([attn.key_dim, attn.key_dim, attn.val_dim], dim=3))
    out = timm_attention(q, k, v, attn.scale, bias)
    out = token_layer(attn.proj.ln, attn.proj.act(out.transpose(1, 2).reshape(B, n, attn.val_attn_dim)))
    return out, (class_row(q, k, attn.scale, bias, query) if query else None)


def block_tokens(block: LevitBlock, x: Tensor, bias: Optional[Tensor],
                 query: Optional[str] = None) -> tuple[Tensor, Optional[Tensor]]:
    """A ``LevitBlock`` (attention and MLP residuals) on tokens; returns ``(x, class row)``."""
    y, row = attention_tokens(block.attn, x, bias, query)
    x = x + block.drop_path1(y)
    return x + block.drop_path2(mlp_tokens(block.mlp, x)), row


def subsample(t: Tensor, resolution: tuple[int, int], stride: int) -> Tensor:
    """Every ``stride``-th row and column of grid values ``t`` ``(B, H*W, ...)``."""
    B = t.shape[0]
    return t.reshape(B, resolution[0], resolution[1], *t.shape[2:])[:, ::stride, ::stride].reshape(
        B, -1, *t.shape[2:])


def downsample_tokens(ds: LevitDownsample, x: Tensor, num_prefix: int,
                      query: Optional[str] = None) -> tuple[Tensor, Optional[Tensor]]:
    """A ``LevitDownsample`` on the full grid ``x[:, P:]`` with ``P`` prefix (class) tokens in front.

    Queries are the subsampled grid, and each prefix token queries for itself, so a class
    token is carried into the next stage. Returns the new tokens ``(B, P + N_q, C_out)`` and,
    if ``query`` is given, the class-attention row over the ``N_k`` grid keys.
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
    bias = F.pad(ad.get_attention_biases(x.device), (P, 0, P, 0))  # prefix queries and keys: no position
    out = timm_attention(q, k, v, ad.scale, bias)
    out = token_layer(ad.proj.ln, ad.proj.act(out.transpose(1, 2).reshape(B, m, ad.val_attn_dim)))
    out = out + ds.drop_path(mlp_tokens(ds.mlp, out))
    row = None
    if query:
        qs = q if query == "first" else q[:, :, P:]
        bs = bias if query == "first" else bias[..., P:, :]
        row = class_row(qs, k, ad.scale, bs, query)[:, P:]
    return out, row


def stage_grid(stage: LevitStage) -> tuple[int, int]:
    """``(H, W)`` of the tokens inside a stage (after its downsampling)."""
    res = stage.blocks[0].attn.resolution if len(stage.blocks) else (0, 0)
    return int(res[0]), int(res[1])


def stem_tokens(model: Levit, x: Tensor) -> Tensor:
    """The stem's output as tokens ``(B, N, C)`` (both variants)."""
    return model.stem(x).flatten(2).transpose(1, 2)

"""timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, AugReg, register-token ViTs).

Thin class swaps in the style of ToMe: the model, its blocks and their attention modules get
subclasses of timm's own classes. :class:`TokenBlock` is the one ViT block every method runs
through, with its hook points (before the block, after attention, after the block);
:class:`TokenAttention` is the one attention, fused, returning the by-products a hook asks
for and taking a logit bias (proportional attention) or a keep mask (DynamicViT training).
Weights and submodules stay timm's.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from ..errors import TokenSparseError
from ..ops import (
    attention_by_head,
    attention_matrix,
    attention_probs,
    class_attention,
    gather_tokens,
    policy_softmax,
    sum_tokens,
)
from ..state import TokenState
from .base import EXPLICIT, HOOK, AttentionExtras, BlockHook, TokenFamily, attach, block_hook, slot, swap_class


def attention_extras(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None,
                     needs: frozenset[str], probs: tuple[Tensor, ...] | None = None) -> AttentionExtras:
    """The :class:`AttentionExtras` fields named in ``needs`` from per-head ``q``, ``k``, ``v`` ``(B, H, N, D)``
    (and each head's attention probabilities ``probs`` ``(B, N, N)`` when the attention computed them)."""
    return AttentionExtras(
        received=torch.stack([p.mean(dim=1) for p in probs], dim=1).mean(dim=1)
        if probs is not None and "received" in needs else None,
        probs=probs if "probs" in needs else None,
        cls_attn=class_attention(q, k, scale, bias) if "cls_attn" in needs else None,
        mean_attn=class_attention(q, k, scale, bias, query="mean") if "mean_attn" in needs else None,
        keys=k.transpose(1, 2).mean(dim=2) if "keys" in needs else None,  # (B, N, D) in memory order
        value_norm=v.transpose(1, 2).flatten(2).norm(dim=-1) if "value_norm" in needs else None,
        attention=attention_matrix(q, k, scale, bias) if "attention" in needs else None,
    )


def heads(t: Tensor, num_heads: int) -> Tensor:
    """``(B, N, H * D)`` to ``(B, H, N, D)``."""
    B, N, _ = t.shape
    return t.view(B, N, num_heads, t.shape[-1] // num_heads).transpose(1, 2)


def attend_ahead(x: Tensor, norm: nn.Module, qk: Callable[[Tensor], tuple[Tensor, Tensor]],
                 values: Callable[[Tensor], Tensor], scale: float, bias: Tensor | None, hook: BlockHook,
                 state: TokenState, block: int, dropout: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """One-step-ahead attention (:attr:`BlockHook.merges_ahead`) on the block input ``x`` ``(B, N, C)``.

    ``qk(h)`` gives per-head queries and keys ``(B, H, N, D)`` of the normed tokens ``h``,
    ``values(h)`` their values ``(B, N, H * D)``. The probabilities on the unmerged tokens decide
    the merge (``hook.merge_ahead``); each merged token's output is its group's weighted average
    of rows applied to the values of the merged tokens (the attention to a merged key being the
    sum over its members). Returns the attention output before the output projection ``(B, N', H * D)``
    and the merged tokens ``(B, N', C)``.
    """
    h = norm(x)
    q, k = qk(h)
    probs = attention_probs(q, k, scale, bias)
    merge = hook.merge_ahead(x, probs, state, block)
    H = q.shape[1]
    if merge is None:
        out = dropout(probs) @ heads(values(h), H)
        return out.transpose(1, 2).flatten(2), x
    v = gather_tokens(values(norm(merge.x)), merge.assign)
    out = (dropout(probs) @ heads(v, H)).transpose(1, 2).flatten(2)
    return sum_tokens(out * merge.weights.to(out.dtype), merge.assign, merge.x.shape[1]), merge.x


class TokenAttention(Attention):
    """timm ``Attention`` that takes a logit bias or a keep mask and returns scoring by-products."""

    def forward_tokens(self, x: Tensor, bias: Tensor | None = None, keep: Tensor | None = None,
                       needs: frozenset[str] = frozenset()) -> tuple[Tensor, AttentionExtras]:
        """Attention on ``x`` ``(B, N, C)``; ``bias`` broadcastable to ``(B, H, N, N)``.

        ``keep`` ``(B, N)``: attend only to kept keys (and the query itself), multiplicatively
        so that gradients reach the mask (:func:`~tokensparse.ops.policy_softmax`); this is the
        one path that materialises the attention matrix (DynamicViT training).
        """
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        probs = None
        if keep is not None:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            weights = policy_softmax(logits if bias is None else logits + bias, keep)
            out = self.attn_drop(weights).to(v.dtype) @ v
        elif needs & EXPLICIT:
            out, probs = attention_by_head(q, k, v, self.scale, bias, self.attn_drop)
        elif self.fused_attn:
            mask = None if bias is None else bias.to(q.dtype)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            out = self.attn_drop(attn.softmax(dim=-1)) @ v
        out = out.transpose(1, 2).flatten(2)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        out = self.proj_drop(self.proj(out))
        return out, attention_extras(q, k, v, self.scale, bias, needs, probs)

    def forward_ahead(self, x: Tensor, norm: nn.Module, bias: Tensor | None, hook: BlockHook, state: TokenState,
                      block: int) -> tuple[Tensor, Tensor]:
        """One-step-ahead attention on the block input ``x`` (:func:`attend_ahead`): the attention
        output ``(B, N', C)`` and the merged tokens. Queries and keys come from the unmerged tokens,
        values from the merged ones (the qkv projection split, as the MCTF authors' code)."""
        w, b = self.qkv.weight, self.qkv.bias
        width = self.num_heads * self.head_dim

        def qk(h: Tensor) -> tuple[Tensor, Tensor]:
            t = F.linear(h, w[:2 * width], None if b is None else b[:2 * width])
            q, k = t.view(h.shape[0], h.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            return self.q_norm(q), self.k_norm(k)

        def values(h: Tensor) -> Tensor:
            return F.linear(h, w[2 * width:], None if b is None else b[2 * width:])

        out, x = attend_ahead(x, norm, qk, values, self.scale, bias, hook, state, block, self.attn_drop)
        out = self.norm(out)
        if getattr(self, "gate", None) is not None:
            out = out * self.gate(norm(x)).sigmoid()
        return self.proj_drop(self.proj(out)), x


class TokenBlock(Block):
    """timm ``Block`` with hook points: before the block, after attention, after the block."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise TokenSparseError("token reduction does not support attention masks or causal attention")
        s = self.__dict__["_ts"]
        state: TokenState = s.state
        state.ensure_started(x)
        if x.shape[0] == 0:  # an empty batch: nothing to reduce, the block as it was
            return super().forward(x)
        hook: BlockHook | None = self._modules.get(HOOK)
        if hook is None:
            y, _ = self.attn.forward_tokens(self.norm1(x), state.attn_bias(), state.attn_policy())
            x = x + self.drop_path1(self.ls1(y))
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        x = hook.before(x, state, s.index)
        if hook.merges_ahead:
            y, x = self.attn.forward_ahead(x, self.norm1, state.attn_bias(), hook, state, s.index)
            extras = AttentionExtras()
        else:
            y, extras = self.attn.forward_tokens(self.norm1(x), state.attn_bias(), state.attn_policy(), hook.needs)
        x = x + self.drop_path1(self.ls1(y))
        x = hook.after_attn(x, extras, state, s.index)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return hook.after(x, state, s.index)


def token_weights(state: TokenState, start: int) -> Tensor | None:
    """``(B, N - start, 1)`` what each token from ``start`` on stands for in pooling, or None when
    every token counts once: the training keep mask (prefix tokens kept) or the token sizes."""
    if state.policy is not None:
        return state.attn_policy()[:, start:].unsqueeze(-1)
    if state.size is not None:
        return state.size[:, start:]
    return None


def pool_tokens(x: Tensor, state: TokenState, num_prefix: int) -> Tensor | None:
    """Average of the tokens ``x[:, num_prefix:]`` weighted by what each one stands for, or None if unweighted.

    Weights: the training keep mask (dropped tokens do not count) or the token sizes
    (merged tokens count once per patch they hold).
    """
    w = token_weights(state, num_prefix)
    if w is None:
        return None
    total = w.sum(dim=1)
    return (x[:, num_prefix:] * w).sum(dim=1) / (total.clamp_min(1.0) if state.policy is not None else total)


def max_tokens(x: Tensor, state: TokenState, start: int) -> Tensor:
    """Maximum over the tokens ``x[:, start:]`` that count (a masked token does not)."""
    x = x[:, start:]
    if state.policy is not None:
        x = x.masked_fill(state.attn_policy()[:, start:].unsqueeze(-1) == 0, float("-inf"))
    return x.amax(dim=1)


def latent_pool(pool: nn.Module, x: Tensor, weights: Tensor | None, masked: bool) -> Tensor:
    """timm's ``AttentionPoolLatent`` (attention pooling, ``global_pool='map'``) on ``x`` ``(B, N, C)``
    with the latent queries' attention to each token weighted: sizes ``weights`` ``(B, N, 1)`` enter
    as a ``log(size)`` key bias (proportional attention: a merged token weighs as the patches it
    holds), a training keep mask (``masked``) multiplies the attention, renormalised."""
    if weights is None:
        return pool(x)
    if pool.pos_embed is not None:
        raise TokenSparseError("this model's attention pooling adds a position embedding per token, which a "
                               "reduced token set cannot take; use a token reduction that keeps every token "
                               "(or a model without attn_pool.pos_embed)")
    B, N, C = x.shape
    q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, pool.latent_len, pool.num_heads, pool.head_dim).transpose(1, 2)
    k, v = pool.kv(x).reshape(B, N, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = pool.q_norm(q), pool.k_norm(k)
    w = weights.squeeze(-1).reshape(B, 1, 1, N).float()
    if masked:
        attn = ((q.float() * pool.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1) * w
        attn = attn / (attn.sum(dim=-1, keepdim=True) + 1e-12)
    else:
        attn = attention_probs(q, k, pool.scale, w.log()).float()
    out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(B, pool.latent_len, C)
    out = pool.proj_drop(pool.proj(out))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    if pool.pool == "token":
        return out[:, 0]
    return out.mean(1) if pool.pool == "avg" else out


def embed_tokens(model: VisionTransformer, x: Tensor) -> Tensor:
    """The tokens entering block 0: patch and position embedding, patch dropout, pre-norm."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


def unmerge(full: Tensor, x: Tensor, token_map: Tensor, num_prefix: int) -> Tensor:
    """Patch map ``(B, N0, C)``: each position takes the feature of the token ``token_map``
    ``(B, N0)`` says holds it (merged tokens broadcast back to every patch they hold); a position
    no token holds (-1: dropped) keeps its value in ``full``."""
    held = token_map >= 0
    gathered = gather_tokens(x, token_map.clamp_min(0))
    return torch.where(held.unsqueeze(-1), gathered, full)


def checkpointing_error(model: nn.Module) -> TokenSparseError:
    """The error for gradient checkpointing on a patched model: it recomputes blocks in the
    backward pass, and a method's blocks change the tokens and the pass's records, so the
    recomputation would not match (torch's CheckpointError, an IndexError, or silent errors)."""
    s = slot(model)
    method = None if s is None else s.config.get("method")
    name = f"'{method.name}'" if method is not None else "a tokensparse method"
    return TokenSparseError(
        f"gradient checkpointing cannot be used on a model patched with {name}: the recomputed blocks "
        f"would not see the tokens the method kept; call model.set_grad_checkpointing(False), or "
        f"tokensparse.unpatch(model) before enabling it")


class TokenVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` that starts and ends the pass's bookkeeping, pools by token weight
    and returns full-grid intermediate features however many tokens remain."""

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """timm's; with ``TokenState.pool == "mean"`` the tokens before the final norm (the head
        normalises their mean: ``head(norm(mean(tokens)))``, as Evo-ViT's authors and timm's
        ``fc_norm`` average pooling)."""
        if self.grad_checkpointing:
            raise checkpointing_error(self)
        state: TokenState = self.__dict__["_ts"].state
        state.finish()
        try:
            if state.pool == "mean":
                if attn_mask is not None or is_causal:
                    raise TokenSparseError("token reduction does not support attention masks or causal attention")
                out = self.blocks(embed_tokens(self, x))
            else:
                out = super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        finally:
            state.finish()
        if state.keep_features:
            state.features = out
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Refused while patched (:func:`checkpointing_error`); disabling is allowed."""
        if enable:
            raise checkpointing_error(self)
        super().set_grad_checkpointing(False)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        """``state.pool == "mean"``: the final norm of the mean of the patch tokens. Otherwise timm's
        pooling with each token weighted by what it stands for once tokens were merged or masked
        (:func:`token_weights`): size-weighted averages (``avg``, the mean half of ``avgmax``, with
        or without the prefix tokens), attention pooling (``map``) with a ``log(size)`` key bias,
        and masked tokens left out of ``max``; the class token (``token``) needs nothing."""
        state: TokenState = self.__dict__["_ts"].state
        if state.pool == "mean":
            return self.norm(x[:, self.num_prefix_tokens:].mean(dim=1))
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        if self.attn_pool is not None:
            return latent_pool(self.attn_pool, x[:, start:], token_weights(state, start), state.policy is not None)
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type in ("avg", "avgmax", "max") and token_weights(state, start) is not None:
            if pool_type == "max":
                return max_tokens(x, state, start)
            mean = pool_tokens(x, state, start)
            return mean if pool_type == "avg" else 0.5 * (max_tokens(x, state, start) + mean)
        return super().pool(x, pool_type)

    def forward_intermediates(
            self, x: Tensor, indices: int | list[int] | None = None, return_prefix_tokens: bool = False,
            norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
            output_dict: bool = False, attn_mask: Tensor | None = None, is_causal: bool = False) -> Any:
        """timm's ``forward_intermediates`` (same arguments and outputs) on the full patch grid.

        After each block every patch position gets the feature of the token that holds it:
        merged tokens are broadcast back to every patch they hold (as ToMe's unmerge), and a
        position whose token was dropped keeps the last feature it had before (Evo-ViT's
        placeholders: their value at the stage start, until the stage restores them). The
        final features (the first output) are the reduced tokens, as ``forward_features``. With
        nothing reduced the intermediates equal timm's.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise TokenSparseError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        if attn_mask is not None or is_causal:
            raise TokenSparseError("token reduction does not support attention masks or causal attention")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        state: TokenState = self.__dict__["_ts"].state
        P = self.num_prefix_tokens
        B, _, height, width = x.shape
        state.finish()
        try:
            x = embed_tokens(self, x)
            full = x[:, P:]
            intermediates, prefixes = [], []
            for i, blk in enumerate(self.blocks[:max_index + 1] if stop_early else self.blocks):
                x = blk(x)
                full = unmerge(full, x, state.token_map(), P)
                if i in take:
                    y = torch.cat([x[:, :P], full], dim=1)
                    y = self.norm(y) if norm else y
                    prefixes.append(y[:, :P])
                    intermediates.append(y[:, P:])
        finally:
            state.finish()
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out: dict[str, Any] = {"image_intermediates": intermediates}
            if P and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefixes
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if P and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefixes))
        return intermediates if intermediates_only else (self.norm(x), intermediates)


class ViTFamily(TokenFamily):
    """timm ``VisionTransformer`` built from timm's ``Block`` / ``Attention``."""
    name: ClassVar[str] = "vit"
    model_classes: ClassVar[tuple[type, ...]] = (VisionTransformer,)
    description: ClassVar[str] = "timm VisionTransformer (ViT, DeiT, distilled DeiT, AugReg, register-token ViTs)"
    pools: ClassVar[tuple[str, ...]] = ("model", "mean")
    merges_ahead: ClassVar[bool] = True

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    @property
    def num_prefix(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def has_class_token(self) -> bool:
        return bool(getattr(self.model, "has_class_token", False))

    @property
    def has_head(self) -> bool:
        """Whether the model outputs class logits (``num_classes=0``: pooled features, no classifier)."""
        return int(getattr(self.model, "num_classes", 0)) > 0

    @property
    def head_pools_tokens(self) -> bool:
        """Whether the head is timm's token pooling (``pool`` applies), not a model's own head."""
        return type(self.model).forward_head is VisionTransformer.forward_head

    def check(self, method: str) -> None:
        for i, blk in enumerate(self.model.blocks):
            if not isinstance(blk, Block) or not isinstance(blk.attn, Attention):
                raise TokenSparseError(
                    f"block {i} of this VisionTransformer is a {type(blk).__name__} with "
                    f"{type(getattr(blk, 'attn', None)).__name__} attention; supported: timm Block with "
                    f"Attention (ViT, DeiT, AugReg, register-token ViTs)")
        if getattr(self.model, "grad_checkpointing", False):
            raise TokenSparseError("disable gradient checkpointing (model.set_grad_checkpointing(False)) before patching")

    def install(self, state: TokenState, hooks: dict[int, BlockHook]) -> None:
        swap_class(self.model, TokenVisionTransformer, state)
        for i, blk in enumerate(self.model.blocks):
            swap_class(blk, TokenBlock, state, i)
            swap_class(blk.attn, TokenAttention, state, i)
            if i in hooks:
                attach(blk, HOOK, hooks[i])

    def run_to(self, x: Tensor, start: int) -> Tensor:
        return self.run_blocks(embed_tokens(self.model, x), 0, start)

    def run_blocks(self, x: Tensor, start: int, end: int) -> Tensor:
        for blk in self.model.blocks[start:end]:
            x = blk(x)
        return x

    def final_norm_tokens(self, x: Tensor) -> Tensor:
        return self.model.norm(x)

    def token_probes(self, i: int) -> tuple[nn.Module, nn.Module]:
        blk = self.model.blocks[i]
        return blk.norm1, blk.norm2

    def patch_grid(self) -> tuple[int, int]:
        h, w = self.model.patch_embed.grid_size
        return int(h), int(w)

    def width(self) -> int:
        """Channels of the tokens."""
        return int(self.model.embed_dim)


__all__ = [
    "TokenAttention",
    "TokenBlock",
    "TokenVisionTransformer",
    "ViTFamily",
    "attend_ahead",
    "attention_extras",
    "block_hook",
    "checkpointing_error",
    "latent_pool",
    "max_tokens",
    "pool_tokens",
    "token_weights",
]

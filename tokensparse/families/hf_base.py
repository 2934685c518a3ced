"""The machinery every Hugging Face ``transformers`` family shares: one parameterised encoder family.

ViT / DeiT, DINOv2, CLIP and SigLIP vision towers are the same pre-norm transformer; their
layers differ in attribute names (and DINOv2 adds layer scales and drop path). A family
file gives a :class:`LayerLayout` (the names inside a layer and its attention), the
transformers classes it accepts, where the blocks sit in the encoder, what runs before
them (embeddings, CLIP's pre-norm) and after (the final norm), and which token is the class
token; :class:`HFEncoderFamily` does the rest, as ``families/vit.py`` does for timm:

- the layers get :class:`HFTokenLayer`, which calls the method's hook at the three hook
  points, and their attention :class:`HFTokenAttention`: always ``scaled_dot_product_attention``
  (whatever ``config._attn_implementation`` says) with the proportional-attention bias or
  DynamicViT's training keep mask from the :class:`~tokensparse.state.TokenState`, returning
  the :class:`~tokensparse.families.base.AttentionExtras` a hook asks for;
- the model the user patched and its encoder get :class:`HFTokenModel`, which starts and
  finishes the pass around transformers' own ``forward`` (so ``return_dict``, labels and the
  heads keep working) and refuses gradient checkpointing; a head that averages tokens gets
  :class:`PooledClassifier`, which weights them by size;
- :meth:`HFEncoderFamily.forward_head` computes a classifier's logits from its final tokens
  as transformers does (the family's :class:`LogitHead`), for calibration and training.

Weights and submodules stay transformers'. What a method cannot get from a reduced model is
refused clearly: ``output_attentions`` / ``output_hidden_states`` (attention is fused and the
token count changes from layer to layer) and attention masks.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils.generic import can_return_tuple

from ..errors import TokenSparseError
from ..ops import attention_by_head, policy_softmax
from ..state import TokenState
from .base import EXPLICIT, HOOK, AttentionExtras, BlockHook, attach, model_state, slot, swap_class
from .hf import SUPPORTED_TRANSFORMERS, TESTED_TRANSFORMERS, HFFamily
from .vit import attend_ahead, attention_extras, heads, pool_tokens

MASK_ERROR = "token reduction does not support attention masks on transformers models (every token attends to all)"


def layout_error(model: nn.Module, what: str) -> TokenSparseError:
    """The error for a transformers model whose modules are not laid out as this family expects."""
    return TokenSparseError(
        f"cannot patch this {type(model).__name__}: {what}. tokensparse supports {SUPPORTED_TRANSFORMERS} "
        f"(tested with {TESTED_TRANSFORMERS}); installed: transformers {transformers.__version__}. Install a "
        f"supported version (pip install 'tokensparse[hf]')")


def checkpointing_error() -> TokenSparseError:
    """Gradient checkpointing recomputes layers in the backward pass, and a method's layers change
    the tokens and the pass's records, so the recomputation would not match."""
    return TokenSparseError(
        "gradient checkpointing cannot be used on a token-reduced transformers model: the recomputed layers would "
        "not see the tokens the method kept; call model.activation_checkpointing_disable() (or the older "
        "gradient_checkpointing_disable()), or tokensparse.unpatch(model) before enabling it")


def resolve(module: nn.Module, path: str) -> Any:
    """``module.a.b`` for ``path`` ``"a.b"`` (``""``: the module itself), or None if any part is missing."""
    for part in filter(None, path.split(".")):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


# ----------------------------------------------------------------------------- layers

@dataclass(frozen=True)
class LayerLayout:
    """Attribute names of one family's encoder layer and its attention.

    A layer computes ``x + post_attn(attn(norm1(x)))`` then ``x + post_mlp(mlp(norm2(x)))``,
    where ``post_*`` apply the named submodules in order (ViT's dropout, DINOv2's layer scale
    and drop path; none for CLIP / SigLIP). The attention has linear ``q``, ``k``, ``v`` and
    ``out`` projections, ``head_dim``, a float ``scale`` and an attention dropout probability
    ``dropout``.
    """
    norm1: str
    attn: str
    norm2: str
    mlp: str
    post_attn: tuple[str, ...]
    post_mlp: tuple[str, ...]
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    out: str = "o_proj"
    scale: str = "scaling"
    dropout: str = "attention_dropout"

    def layer_problem(self, layer: nn.Module) -> str | None:
        """What ``layer`` lacks of this layout, or None."""
        missing = [n for n in (self.norm1, self.attn, self.norm2, self.mlp, *self.post_attn, *self.post_mlp)
                   if not isinstance(getattr(layer, n, None), nn.Module)]
        if missing:
            return f"its {type(layer).__name__} has no {', '.join(missing)}"
        attn = getattr(layer, self.attn)
        missing = [n for n in (self.q, self.k, self.v, self.out) if not isinstance(getattr(attn, n, None), nn.Linear)]
        missing += [n for n in ("head_dim", self.scale, self.dropout)
                    if not isinstance(getattr(attn, n, None), (int, float))]
        if missing:
            return f"its {type(attn).__name__} has no {', '.join(missing)}"
        return None


class HFTokenAttention(nn.Module):
    """A transformers attention module, fused, taking a logit bias or a keep mask and returning scoring by-products.

    Subclasses set ``layout``; :class:`HFTokenLayer` calls :meth:`forward_tokens`.
    """
    layout: ClassVar[LayerLayout]

    def forward_tokens(self, x: Tensor, bias: Tensor | None = None, keep: Tensor | None = None,
                       needs: frozenset[str] = frozenset()) -> tuple[Tensor, AttentionExtras]:
        """Attention on ``x`` ``(B, N, C)``; ``bias`` broadcastable to ``(B, H, N, N)``; ``keep`` ``(B, N)``:
        attend only to kept keys (and the query itself), multiplicatively so that gradients reach the
        mask (DynamicViT training: the one path that materialises the attention matrix)."""
        lay = self.layout
        D = int(self.head_dim)
        q, k, v = (getattr(self, name)(x) for name in (lay.q, lay.k, lay.v))
        q, k, v = (heads(t, t.shape[-1] // D) for t in (q, k, v))
        scale = float(getattr(self, lay.scale))
        p = float(getattr(self, lay.dropout)) if self.training else 0.0
        probs = None
        if keep is not None:
            logits = (q * scale) @ k.transpose(-2, -1)
            weights = policy_softmax(logits if bias is None else logits + bias, keep)
            out = F.dropout(weights, p, self.training).to(v.dtype) @ v
        elif needs & EXPLICIT:
            out, probs = attention_by_head(q, k, v, scale, bias, lambda w: F.dropout(w, p, self.training))
        else:
            mask = None if bias is None else bias.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
        out = getattr(self, lay.out)(out.transpose(1, 2).flatten(2))
        return out, attention_extras(q, k, v, scale, bias, needs, probs)

    def forward_ahead(self, x: Tensor, norm: nn.Module, bias: Tensor | None, hook: BlockHook, state: TokenState,
                      block: int) -> tuple[Tensor, Tensor]:
        """One-step-ahead attention on the layer input ``x`` (:func:`~tokensparse.families.vit.attend_ahead`):
        the attention output ``(B, N', C)`` and the merged tokens."""
        lay = self.layout
        D = int(self.head_dim)
        p = float(getattr(self, lay.dropout)) if self.training else 0.0

        def qk(h: Tensor) -> tuple[Tensor, Tensor]:
            q, k = getattr(self, lay.q)(h), getattr(self, lay.k)(h)
            return heads(q, q.shape[-1] // D), heads(k, k.shape[-1] // D)

        out, x = attend_ahead(x, norm, qk, getattr(self, lay.v), float(getattr(self, lay.scale)), bias, hook, state,
                              block, lambda t: F.dropout(t, p, self.training))
        return getattr(self, lay.out)(out), x


class HFTokenLayer(nn.Module):
    """A transformers encoder layer with hook points: before the layer, after attention, after the layer.

    Subclasses set ``layout``. transformers calls ``layer(hidden_states, attention_mask, **kwargs)``.
    """
    layout: ClassVar[LayerLayout]

    def _branch(self, y: Tensor, names: tuple[str, ...]) -> Tensor:
        for name in names:
            y = getattr(self, name)(y)
        return y

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        # A user's attention mask is refused by the model (refuse_outputs); what reaches a layer is the
        # all-attend mask transformers builds itself while tracing (torch.export, ONNX), so it is ignored.
        if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            raise checkpointing_error()
        lay = self.layout
        s = self.__dict__["_ts"]
        state: TokenState = s.state
        x = hidden_states
        state.ensure_started(x)
        if x.shape[0] == 0:  # an empty batch: nothing to reduce, the layer as it was
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        attn, norm1 = getattr(self, lay.attn), getattr(self, lay.norm1)
        hook: BlockHook | None = self._modules.get(HOOK)
        if hook is None:
            y, _ = attn.forward_tokens(norm1(x), state.attn_bias(), state.attn_policy())
            x = x + self._branch(y, lay.post_attn)
            return x + self._branch(getattr(self, lay.mlp)(getattr(self, lay.norm2)(x)), lay.post_mlp)
        x = hook.before(x, state, s.index)
        if hook.merges_ahead:
            y, x = attn.forward_ahead(x, norm1, state.attn_bias(), hook, state, s.index)
            extras = AttentionExtras()
        else:
            y, extras = attn.forward_tokens(norm1(x), state.attn_bias(), state.attn_policy(), hook.needs)
        x = x + self._branch(y, lay.post_attn)
        x = hook.after_attn(x, extras, state, s.index)
        x = x + self._branch(getattr(self, lay.mlp)(getattr(self, lay.norm2)(x)), lay.post_mlp)
        return hook.after(x, state, s.index)


# ----------------------------------------------------------------------------- models

def _holds_weights(part: Any) -> bool:
    """Whether something patching added is, or holds, parameters (learned parts, not a method's hook)."""
    if isinstance(part, nn.Parameter):
        return True
    return isinstance(part, nn.Module) and next(part.parameters(), None) is not None


def refuse_outputs(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """Refuse per-layer outputs a reduced model cannot give (clear error, not silently empty tuples), and
    attention masks (every token attends to all)."""
    if kwargs.get("attention_mask") is not None:
        raise TokenSparseError(MASK_ERROR)
    config = getattr(model, "config", None)
    for name in ("output_attentions", "output_hidden_states"):
        if kwargs.get(name, getattr(config, name, False)):
            raise TokenSparseError(
                f"{name} is not available on a token-reduced model (attention runs fused and the number of tokens "
                f"changes from layer to layer); call tokensparse.unpatch(model) first, or use "
                f"tokensparse.location_records(model)")


class HFTokenModel(nn.Module):
    """The patched transformers model and its vision encoder: start and finish the pass around
    transformers' ``forward``; the encoder keeps its final tokens when the method asks
    (``TokenState.keep_features``, DynamicViT training). Gradient checkpointing is refused.

    Subclasses that replace a head that averages tokens override ``forward`` and call
    :meth:`token_pass` with their own function.
    """

    def token_pass(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` as one pass of the token state."""
        refuse_outputs(self, kwargs)
        s = self.__dict__["_ts"]
        state: TokenState = s.state
        state.finish()
        try:
            out = fn(*args, **kwargs)
        finally:
            state.finish()
        if state.keep_features and s.config.get("encoder"):
            state.features = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.token_pass(super().forward, *args, **kwargs)

    def ts_encoder(self) -> nn.Module:
        """The vision encoder inside this model (itself for an encoder)."""
        return resolve(self, self.__dict__["_ts"].config["encoder_path"])

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``save_pretrained``: the model's own weights. Refused while patching added
        learned parts (DynamicViT's predictors): ``from_pretrained`` would drop them and return an
        unpatched model. Save those with ``save_predictors`` and restore with ``patch``."""
        added = [f"{name}.{part}" if name else part for name, m in self.named_modules()
                 for part in (getattr(slot(m), "added", None) or []) if _holds_weights(getattr(m, part, None))]
        if added:
            method = self.__dict__["_ts"].config.get("method")
            name = method.name if method is not None else "a tokensparse method"
            raise TokenSparseError(
                f"save_pretrained cannot keep what patching with {name} added ({len(added)} parts, e.g. {added[0]}): "
                f"from_pretrained would drop them. Save them with tokensparse.methods.dynamicvit.save_predictors(model, "
                f"'predictors.safetensors'), then tokensparse.unpatch(model) and model.save_pretrained(...); restore "
                f"with from_pretrained(...) and tokensparse.patch(model, 'dynamicvit:predictors=predictors.safetensors')")
        return super().save_pretrained(*args, **kwargs)

    def _set_gradient_checkpointing(self, enable: bool = True, *args: Any, **kwargs: Any) -> None:
        """Refused while patched (:func:`checkpointing_error`); disabling is allowed."""
        if enable:
            raise checkpointing_error()
        super()._set_gradient_checkpointing(enable, *args, **kwargs)


def pooled_mean(x: Tensor, state: TokenState | None, num_prefix: int) -> Tensor:
    """The mean of the patch tokens ``x[:, P:]`` as the model computes it, weighted by token size (or the
    training keep mask) once tokens were merged or masked (:func:`~tokensparse.families.vit.pool_tokens`)."""
    pooled = None if state is None else pool_tokens(x, state, num_prefix)
    return x[:, num_prefix:].mean(dim=1) if pooled is None else pooled


LogitHead = Callable[[nn.Module, Tensor, "TokenState | None", int], Tensor]
"""``head(model, tokens, state, num_prefix)``: a classifier's logits from its final tokens
(``last_hidden_state``), as transformers computes them (``state``: the pass state of a patched model)."""


def class_token_logits(model: nn.Module, tokens: Tensor, state: TokenState | None, num_prefix: int) -> Tensor:
    """``classifier(class token)`` (ViT, DeiT)."""
    return model.classifier(tokens[:, 0])


def mean_pool_logits(model: nn.Module, tokens: Tensor, state: TokenState | None, num_prefix: int) -> Tensor:
    """``classifier(mean of the tokens after the prefix)``, weighted by size (CLIP, SigLIP)."""
    return model.classifier(pooled_mean(tokens, state, num_prefix))


class PooledClassifier(HFTokenModel):
    """A transformers classifier whose head averages tokens (``vision model`` then ``classifier``): the
    family's :class:`LogitHead` computes the logits, so merged tokens are weighted by size."""

    def forward(self, pixel_values: Tensor | None = None, labels: Tensor | None = None, **kwargs: Any) -> Any:
        return self.token_pass(self._classify, pixel_values, labels, **kwargs)

    @can_return_tuple
    def _classify(self, pixel_values: Tensor | None, labels: Tensor | None, **kwargs: Any) -> ImageClassifierOutput:
        outputs = self.ts_encoder()(pixel_values, **kwargs)
        s = self.__dict__["_ts"]
        logits = s.config["logits"](self, outputs.last_hidden_state, s.state, s.state.num_prefix)
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


# ----------------------------------------------------------------------------- the family

@dataclass(frozen=True)
class EncoderLayout:
    """Where a transformers vision encoder keeps its parts (attribute paths under the encoder).

    ``blocks``: its layer list; ``embed``: the modules run before block 0, in order; ``final_norm``:
    the norm applied to the final tokens (``last_hidden_state``), or None; ``class_token``: the
    embeddings' class token parameter (None: no class token); ``extra_prefix``: further prefix-token
    parameters ``(1, n, C)`` of the embeddings after it (distillation token, registers).
    """
    blocks: str = "layers"
    embed: tuple[str, ...] = ("embeddings",)
    final_norm: str | None = None
    class_token: str | None = None
    extra_prefix: tuple[str, ...] = ()


class HFEncoderFamily(HFFamily):
    """A transformers vision-encoder family, parameterised by class attributes (see the module docstring).

    ``layout``: its layers' :class:`LayerLayout` (a subclass gets its ``layer`` / ``attention``:
    :class:`HFTokenLayer` / :class:`HFTokenAttention` subclasses with that layout);
    ``encoder_layout``: the :class:`EncoderLayout`; ``layer_classes`` / ``attention_classes`` /
    ``encoder_classes``: the transformers classes it accepts; ``logit_heads``: classifier class
    name -> its :class:`LogitHead`; ``pooling_heads``: the classifiers among them whose head
    averages tokens (patched with :class:`PooledClassifier`); ``encoder_parts``: path under the
    encoder -> mixin for other modules to patch (SigLIP's pooling head).
    """
    layout: ClassVar[LayerLayout]
    layer: ClassVar[type[HFTokenLayer]]
    attention: ClassVar[type[HFTokenAttention]]
    encoder_layout: ClassVar[EncoderLayout] = EncoderLayout()
    layer_classes: ClassVar[tuple[type, ...]] = ()
    attention_classes: ClassVar[tuple[type, ...]] = ()
    encoder_classes: ClassVar[tuple[type, ...]] = ()
    logit_heads: ClassVar[dict[str, LogitHead]] = {}
    pooling_heads: ClassVar[tuple[str, ...]] = ()
    encoder_parts: ClassVar[dict[str, type[nn.Module]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that sets ``layout`` gets its layer and attention mixins with that layout
        (``HFViT.layer`` is ``ViTTokenLayer``; pickle finds them as ``HFViT.layer``)."""
        super().__init_subclass__(**kwargs)
        if "layout" in cls.__dict__:
            stem = cls.__name__.removeprefix("HF")
            for attr, base in (("layer", HFTokenLayer), ("attention", HFTokenAttention)):
                body = {"layout": cls.layout, "__module__": cls.__module__, "__qualname__": f"{cls.__qualname__}.{attr}"}
                setattr(cls, attr, type(f"{stem}Token{base.__name__.removeprefix('HFToken')}", (base,), body))

    # --------------------------------------------------------------- where things are

    @property
    def model_class(self) -> type:
        """The transformers class of the model (its original class when patched)."""
        s = slot(self.model)
        cls = s.original if s is not None and s.original is not None else type(self.model)
        for c in cls.__mro__:
            if c.__name__ in self.classes and c.__module__.startswith("transformers."):
                return c
        raise layout_error(self.model, f"{cls.__name__} is not one of {', '.join(self.classes)}")

    @property
    def encoder(self) -> nn.Module:
        """The vision encoder (the module holding the embeddings and the layers)."""
        enc = resolve(self.model, self.classes[self.model_class.__name__])
        if not isinstance(enc, self.encoder_classes):
            names = " or ".join(c.__name__ for c in self.encoder_classes)
            raise layout_error(self.model, f"its vision encoder is not a {names}")
        return enc

    @property
    def blocks(self) -> Sequence[nn.Module]:
        layers = resolve(self.encoder, self.encoder_layout.blocks)
        if not isinstance(layers, nn.ModuleList):
            raise layout_error(self.model, f"its {type(self.encoder).__name__} has no {self.encoder_layout.blocks} layer list")
        return layers

    @property
    def embeddings(self) -> nn.Module:
        emb = getattr(self.encoder, "embeddings", None)
        if not isinstance(emb, nn.Module):
            raise layout_error(self.model, f"its {type(self.encoder).__name__} has no embeddings")
        return emb

    @property
    def has_class_token(self) -> bool:
        return self.encoder_layout.class_token is not None

    @property
    def num_prefix(self) -> int:
        emb = self.embeddings
        n = int(self.has_class_token)
        for name in self.encoder_layout.extra_prefix:
            param = getattr(emb, name, None)
            if isinstance(param, Tensor):
                n += int(param.shape[-2])
        return n

    # --------------------------------------------------------------- checks

    def check_layout(self) -> None:
        """A clear error if the model's modules are not laid out as this family (and transformers
        version) expects: every attribute the patched classes use is checked here."""
        enc, layers, parts = self.encoder, self.blocks, self.encoder_layout
        for name in (*parts.embed, *([parts.final_norm] if parts.final_norm else [])):
            if not isinstance(resolve(enc, name), nn.Module):
                raise layout_error(self.model, f"its {type(enc).__name__} has no {name}")
        if parts.class_token is not None and not isinstance(getattr(self.embeddings, parts.class_token, None), Tensor):
            raise layout_error(self.model, f"its embeddings have no {parts.class_token}")
        if not layers:
            raise TokenSparseError(f"this {type(self.model).__name__} has no layers")
        if self.model_class.__name__ in self.pooling_heads and not isinstance(getattr(self.model, "classifier", None),
                                                                              nn.Module):
            raise layout_error(self.model, "it has no classifier")
        for i, layer in enumerate(layers):
            attn = getattr(layer, self.layout.attn, None)
            if not isinstance(layer, self.layer_classes) or not isinstance(attn, self.attention_classes):
                raise layout_error(
                    self.model, f"layer {i} is a {type(layer).__name__} with {type(attn).__name__} attention; "
                                f"supported: {' / '.join(c.__name__ for c in self.layer_classes)}")
            problem = self.layout.layer_problem(layer)
            if problem:
                raise layout_error(self.model, f"layer {i}: {problem}")
        for path, mixin in self.encoder_parts.items():
            problem = mixin.problem(resolve(enc, path))
            if problem:
                raise layout_error(self.model, f"{path}: {problem}")

    def check(self, method: str) -> None:
        self.check_layout()
        if any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules()):
            raise TokenSparseError("disable gradient checkpointing (model.activation_checkpointing_disable(), or the "
                                   "older gradient_checkpointing_disable()) before patching")

    # --------------------------------------------------------------- patching

    def install(self, state: TokenState, hooks: dict[int, BlockHook]) -> None:
        model, enc, name = self.model, self.encoder, self.model_class.__name__
        head = swap_class(model, PooledClassifier if name in self.pooling_heads else HFTokenModel, state)
        head.config.update(encoder_path=self.classes[name], logits=self.logit_heads.get(name))
        swap_class(enc, HFTokenModel, state).config["encoder"] = True
        for path, mixin in self.encoder_parts.items():
            part = resolve(enc, path)
            if part is not None:
                swap_class(part, mixin, state)
        for i, layer in enumerate(self.blocks):
            swap_class(layer, self.layer, state, i)
            swap_class(getattr(layer, self.layout.attn), self.attention, state, i)
            if i in hooks:
                attach(layer, HOOK, hooks[i])

    # --------------------------------------------------------------- running part of the model

    def run_to(self, x: Tensor, start: int) -> Tensor:
        enc = self.encoder
        x = x.to(self.embeddings_dtype())
        for name in self.encoder_layout.embed:
            x = resolve(enc, name)(x)
        return self.run_blocks(x, 0, start)

    def embeddings_dtype(self) -> torch.dtype:
        return next(self.embeddings.parameters()).dtype

    def run_blocks(self, x: Tensor, start: int, end: int) -> Tensor:
        for layer in self.blocks[start:end]:
            x = layer(x, None)
        return x

    def final_norm_tokens(self, x: Tensor) -> Tensor:
        norm = self.encoder_layout.final_norm
        return x if norm is None else resolve(self.encoder, norm)(x)

    def token_probes(self, i: int) -> tuple[nn.Module, nn.Module]:
        layer, lay = self.blocks[i], self.layout
        return getattr(layer, lay.norm1), getattr(layer, lay.norm2)

    # --------------------------------------------------------------- the whole model

    @property
    def has_head(self) -> bool:
        return self.model_class.__name__ in self.logit_heads

    def forward_features(self, x: Tensor) -> Tensor:
        """``last_hidden_state`` (the final tokens every head reads) from images ``x``."""
        return self.features_from(self.run_to(x, 0), 0)

    def forward_head(self, features: Tensor) -> Tensor:
        """The classifier's logits from ``last_hidden_state``; error for a model without one."""
        head = self.logit_heads.get(self.model_class.__name__)
        if head is None:
            raise TokenSparseError(
                f"{self.model_class.__name__} has no classification head (it outputs features); supported "
                f"classifiers: {', '.join(self.logit_heads)}")
        return head(self.model, features, model_state(self.model), self.num_prefix)

    def patch_grid(self) -> tuple[int, int]:
        config = self.encoder.config
        size, patch = config.image_size, config.patch_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return int(h // ph), int(w // pw)

    def width(self) -> int:
        """Channels of the tokens."""
        return int(self.encoder.config.hidden_size)


__all__ = [
    "EncoderLayout",
    "HFEncoderFamily",
    "HFTokenAttention",
    "HFTokenLayer",
    "HFTokenModel",
    "LayerLayout",
    "LogitHead",
    "PooledClassifier",
    "checkpointing_error",
    "class_token_logits",
    "layout_error",
    "mean_pool_logits",
    "pooled_mean",
    "refuse_outputs",
]

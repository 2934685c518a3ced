"""What a method may ask of a model: the :class:`Family` protocol, block hooks, and patching
by class swaps that one generic :func:`restore` undoes.

Every patched module carries one slot, ``module._ts`` (a :class:`Slot`: its original class,
the pass state it shares, its index, and the names of the submodules and parameters patching
added), as ToMe's single ``_tome_info``. :func:`restore` walks the model once, removes what
the slots name and puts every original class back, so no method needs its own removal code.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

from torch import Tensor, nn

from ..errors import TokenSparseError
from ..state import TokenState

SLOT = "_ts"


@dataclass
class Slot:
    """What patching attached to one module (``module._ts``).

    ``original``: the class before patching (None when only attributes were added);
    ``state``: the pass state shared by the model's patched modules; ``index``: block (or
    stage) index; ``added``: names of submodules / parameters / buffers added to the module;
    ``config``: anything else the family or method keeps per module (e.g. a method instance).
    """
    original: type | None = None
    state: TokenState | None = None
    index: int = 0
    added: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def slot(module: nn.Module) -> Slot | None:
    """The :class:`Slot` of ``module``, or None if patching did not touch it."""
    return module.__dict__.get(SLOT)


def ensure_slot(module: nn.Module) -> Slot:
    """The slot of ``module``, created empty if it has none."""
    s = module.__dict__.get(SLOT)
    if s is None:
        s = module.__dict__[SLOT] = Slot()
    return s


def _reduce_combined(self: nn.Module, protocol: int) -> tuple:
    """Pickle a module of a :func:`combined_class` by its two bases (the class itself is made at run
    time, so it cannot be found by name): ``torch.save`` of a patched model works."""
    mixin, original = type(self).__bases__
    return _new_combined, (mixin, original), self.__getstate__()


def _new_combined(mixin: type, original: type) -> nn.Module:
    cls = combined_class(mixin, original)
    return cls.__new__(cls)


@functools.cache
def combined_class(mixin: type, original: type) -> type:
    """The class with ``mixin``'s methods over ``original``'s (one per pair), picklable."""
    return type(f"{mixin.__name__}_{original.__name__}", (mixin, original), {"__reduce_ex__": _reduce_combined})


def swap_class(module: nn.Module, mixin: type, state: TokenState | None = None, index: int = 0) -> Slot:
    """Give ``module`` a subclass of its class with ``mixin``'s methods; returns its slot.

    ``mixin`` is a subclass of a library class (e.g. ``TokenBlock(Block)``); the module keeps
    its own class's behaviour for everything ``mixin`` does not override.
    """
    s = ensure_slot(module)
    original = s.original or type(module)
    if issubclass(original, mixin):
        new_cls = original
    elif original in mixin.__mro__:
        new_cls = mixin
    else:
        new_cls = combined_class(mixin, original)
    s.original, s.state, s.index = original, state, index
    module.__class__ = new_cls
    return s


def attach(module: nn.Module, name: str, value: nn.Module | nn.Parameter) -> None:
    """Register a new submodule or parameter ``name`` on ``module``, removed again by :func:`restore`."""
    setattr(module, name, value)
    s = ensure_slot(module)
    if name not in s.added:
        s.added.append(name)


def restore(model: nn.Module) -> None:
    """Undo every :func:`swap_class` and :func:`attach` under ``model`` (``model`` included)."""
    for module in list(model.modules()):
        s = module.__dict__.pop(SLOT, None)
        if s is None:
            continue
        for name in s.added:
            for table in (module._modules, module._parameters, module._buffers):
                table.pop(name, None)
        if s.original is not None:
            module.__class__ = s.original


def model_state(model: nn.Module) -> TokenState | None:
    """The pass state of a patched model (None if it is not patched)."""
    s = slot(getattr(model, "module", model))  # DistributedDataParallel
    return None if s is None else s.state


# ----------------------------------------------------------------------------- blocks

@dataclass
class AttentionExtras:
    """By-products of a block's attention that methods score tokens with (None when not asked for).

    ``cls_attn``: ``(B, H, N)`` class-token attention row; ``mean_attn``: ``(B, H, N)`` the
    mean query's row (models without a class token); ``keys``: ``(B, N, D)`` keys averaged
    over heads; ``value_norm``: ``(B, N)`` L2 norm of each token's value vector;
    ``attention``: ``(B, N, N)`` the whole attention matrix averaged over heads (O(N^2): for
    analysis and calibration targets, never a method's eval path); ``received``: ``(B, N)`` the
    mean attention each token receives, over heads and queries (MCTF's informativeness: the
    block's attention then runs on explicit probabilities, which it needs anyway); ``probs``:
    each head's attention probabilities, a tuple of ``H`` tensors ``(B, N, N)`` (Zero-TPrune's attention
    graphs: the block's attention runs on them too, one head at a time, see :data:`EXPLICIT`).
    """
    cls_attn: Tensor | None = None
    mean_attn: Tensor | None = None
    keys: Tensor | None = None
    value_norm: Tensor | None = None
    attention: Tensor | None = None
    received: Tensor | None = None
    probs: tuple[Tensor, ...] | None = None


EXTRAS = frozenset({"cls_attn", "mean_attn", "keys", "value_norm", "attention", "received", "probs"})
EXPLICIT = frozenset({"received", "probs"})
"""Extras computed from the attention probabilities themselves: a block asked for one runs its
attention on explicit probabilities (not the fused kernel) and reuses them."""


class AheadMerge(NamedTuple):
    """A merge decided from a block's attention before its output is computed (MCTF's one-step-ahead).

    ``x``: the merged tokens ``(B, N', C)``; ``assign``: ``(B, N)`` each old token's new index;
    ``weights``: ``(B, N, 1)`` each old token's weight within its group (summing to 1 per group):
    the merged attention output of a group is the weighted average of its members' rows.
    """
    x: Tensor
    assign: Tensor
    weights: Tensor


class BlockHook(nn.Module):
    """A method's code at one block of a token family, run at the block's hook points.

    The family calls, in order: :meth:`before` (on the block's input), the block's attention
    (computing the :class:`AttentionExtras` fields named in ``needs``), :meth:`after_attn`
    (after the attention residual, before the MLP) and :meth:`after` (on the block's output).
    Each returns the (possibly reduced) tokens ``(B, N, C)``; ``block`` is the block's index
    (within its stage for hierarchical families). Every default is the identity.
    A hook lives at ``block.ts_reducer``, so learned hooks are ordinary parameters.

    A hook with ``merges_ahead`` instead merges inside the attention (MCTF's one-step-ahead):
    the family computes the attention probabilities ``(B, H, N, N)`` on the block's input,
    :meth:`merge_ahead` merges the input from them, and the attention output of each merged
    token is its group's weighted average of rows applied to the merged tokens' values (the
    attention to a merged key is the sum over its members); the rest of the block runs on the
    merged tokens.
    """
    needs: frozenset[str] = frozenset()
    merges_ahead: bool = False

    def merge_ahead(self, x: Tensor, attn: Tensor, state: TokenState, block: int) -> AheadMerge | None:
        """Merge the block's input ``x`` from its attention ``attn`` (None: merge nothing here)."""
        return None

    def before(self, x: Tensor, state: TokenState, block: int) -> Tensor:
        return x

    def after_attn(self, x: Tensor, extras: AttentionExtras, state: TokenState, block: int) -> Tensor:
        return x

    def after(self, x: Tensor, state: TokenState, block: int) -> Tensor:
        return x


HOOK = "ts_reducer"
"""Attribute name of a block's :class:`BlockHook`."""


def block_hook(block: nn.Module) -> BlockHook | None:
    """The hook installed on ``block``, or None."""
    return block._modules.get(HOOK)


# ----------------------------------------------------------------------------- the protocol

@runtime_checkable
class Family(Protocol):
    """One model family (a file in :mod:`tokensparse.families`), bound to one model.

    Every family says what it is and how to run part of the model (for calibration). A
    *token* family (:class:`TokenFamily`) runs its blocks on token sequences and calls
    :class:`BlockHook` s; a *routed* family
    (:class:`~tokensparse.families.routed.RoutedFamily`) sends positions of a feature map
    down a slow or a fast path. Methods ask for these capabilities, never for a family by name.
    """
    name: ClassVar[str]
    description: ClassVar[str]
    model: nn.Module

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family."""

    @property
    def blocks(self) -> Sequence[nn.Module]:
        """The blocks methods put their hooks or learned parts on (all blocks, or a routed stage's)."""

    def check(self, method: str) -> None:
        """Raise :class:`TokenSparseError` if the model's modules cannot be patched."""

    def run_to(self, x: Tensor, start: int) -> Tensor:
        """What enters block ``start`` of :attr:`blocks`, from images ``x``."""

    def features_from(self, h: Tensor, start: int) -> Tensor:
        """``forward_features`` from ``h`` entering block ``start`` (records the pass)."""

    def feature_tokens(self, features: Tensor) -> Tensor:
        """``(B, N, C)`` tokens of a ``forward_features`` output."""

    def num_positions(self) -> int:
        """Positions (patch tokens, or routed-stage positions) at the model's default input size."""

    @property
    def has_head(self) -> bool:
        """Whether the model outputs class logits (a classifier, not a feature extractor)."""

    def forward_features(self, x: Tensor) -> Tensor:
        """The final tokens (or feature map) the head reads, from images ``x`` (records the pass)."""

    def forward_head(self, features: Tensor) -> Tensor:
        """Class logits from :meth:`forward_features`' output (classifiers only)."""


class TimmParts:
    """Family defaults for timm models: the model's own ``forward_features`` / ``forward_head``."""
    model: nn.Module

    @property
    def has_head(self) -> bool:
        return callable(getattr(self.model, "forward_head", None))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.model.forward_head(features)


class TokenFamily(TimmParts):
    """Base of families whose blocks run on token sequences ``(B, P + N, C)`` with :class:`BlockHook` s.

    Subclasses implement the :class:`Family` methods and :meth:`install`. Attributes a method
    may read: ``num_prefix`` (class, distillation, register tokens), ``has_class_token``,
    ``depth`` (blocks), ``stage_depths`` (blocks per stage; one stage for plain ViTs),
    ``reducible`` (blocks accept any token subset: False when later stages need the whole
    grid, as LeViT's downsampling), ``pools`` (``TokenState.pool`` values its head takes),
    ``can_add_class_token`` and ``merges_ahead`` (its blocks run hooks that merge inside the
    attention, :attr:`BlockHook.merges_ahead`, and its attention gives ``received``).
    """
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    reducible: ClassVar[bool] = True
    merges_ahead: ClassVar[bool] = False
    class_token_models: ClassVar[bool | None] = None
    """True: every model of the family has a class token; False: none has; None: it depends on the model."""
    pools: ClassVar[tuple[str, ...]] = ("model",)
    can_add_class_token: ClassVar[bool] = False
    model_classes: ClassVar[tuple[type, ...]] = ()
    """The model classes of the family, for the default :meth:`matches`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` is an instance of one of :attr:`model_classes`."""
        return isinstance(model, cls.model_classes)

    @property
    def num_prefix(self) -> int:
        raise NotImplementedError

    @property
    def has_class_token(self) -> bool:
        raise NotImplementedError

    @property
    def stage_depths(self) -> list[int]:
        return [len(self.blocks)]

    @property
    def depth(self) -> int:
        return sum(self.stage_depths)

    @property
    def head_pools_tokens(self) -> bool:
        """Whether the head pools tokens (so ``TokenState.pool`` applies), not a model-specific head."""
        return True

    def run_blocks(self, x: Tensor, start: int, end: int) -> Tensor:
        """Tokens ``x`` through blocks ``start`` to ``end - 1`` (a patched model's blocks use its
        pass state as it stands: start the pass first, see :meth:`record_pass`)."""
        raise NotImplementedError

    def final_norm_tokens(self, x: Tensor) -> Tensor:
        """The model's final norm on the tokens after its last block (what the head reads)."""
        raise NotImplementedError

    def features_from(self, h: Tensor, start: int) -> Tensor:
        """``forward_features`` from ``h`` entering block ``start``, as one recorded pass."""
        return self.record_pass(lambda: self.final_norm_tokens(self.run_blocks(h, start, len(self.blocks))))

    def token_probes(self, i: int) -> tuple[nn.Module, nn.Module]:
        """The modules whose inputs are block ``i``'s attention tokens and its MLP tokens (its two
        norms): their input lengths are the token counts the block computes on."""
        raise NotImplementedError

    def record_pass(self, run: Callable[[], Tensor]) -> Tensor:
        """``run()`` (part of a forward pass) as one recorded pass of the model's state: the pass
        starts fresh and ends after it; the output is kept as ``state.features`` when asked."""
        s = slot(self.model)
        state = None if s is None else s.state
        if state is None:
            return run()
        state.finish()
        try:
            out = run()
        finally:
            state.finish()
        if state.keep_features:
            state.features = out
        return out

    def feature_tokens(self, features: Tensor) -> Tensor:
        """A token family's ``forward_features`` output already is ``(B, N, C)`` tokens."""
        return features

    def patch_grid(self) -> tuple[int, int]:
        """``(H, W)`` of the patch tokens at the model's default input size."""
        raise NotImplementedError

    def num_positions(self) -> int:
        h, w = self.patch_grid()
        return h * w

    def require_class_token(self, method: str) -> None:
        """Raise the clear class-token error if the model has none."""
        if not self.has_class_token:
            raise TokenSparseError(
                f"method '{method}' scores tokens by class attention, but this model has no class token")

    def install(self, state: TokenState, hooks: dict[int, BlockHook]) -> None:
        """Swap classes so the model runs with ``state`` and ``hooks[i]`` at block ``i``.

        For hierarchical families ``i`` counts blocks over all stages in order.
        """
        raise NotImplementedError

    def add_class_token(self) -> nn.Parameter:
        """Add a new learned class token in front of the tokens (families with ``can_add_class_token``)."""
        raise TokenSparseError(f"{self.name} models cannot take a new class token")

"""What every method has: a name, documented options with defaults, validation, and `apply`."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import TokenSparseError
from ..families import AttentionExtras, BlockHook, TokenFamily, get_family
from ..ops import (
    gather_tokens,
    group_assignment,
    group_weights,
    keep_assignment,
    merge_rows,
    prefix_assignment,
    sum_tokens,
    with_prefix,
)
from ..state import TokenState
from .options import OptionInfo, check_bool


class Method:
    """Base class of a token reduction method: its policy, never a model family's code.

    Subclasses set ``name``, ``summary`` and ``options``, validate options in
    :meth:`validate`, say which kinds of family they work on in :meth:`supports_family`, and
    implement :meth:`prepare`, which builds and returns the installer of the method's hooks (or routes) through the
    model's :class:`~tokensparse.families.Family`. Removal is generic
    (:func:`tokensparse.unpatch`).
    """
    name: ClassVar[str]
    summary: ClassVar[str]
    options: ClassVar[tuple[OptionInfo, ...]]
    needs_class_token: ClassVar[bool] = False
    needs_training: ClassVar[bool] = False
    """True when the method's new parts must be trained before its accuracy means anything."""

    def __init__(self, **options: Any) -> None:
        allowed = {o.name for o in self.options}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TokenSparseError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for method '{self.name}'; "
                f"valid options: {', '.join(sorted(allowed)) or '(none)'}")
        self.config: dict[str, Any] = {o.name: o.default for o in self.options}
        self.config.update(options)
        self.validate()

    def validate(self) -> None:
        """Check option values; raise :class:`TokenSparseError` naming the bad one."""

    @classmethod
    def supports_family(cls, family: type) -> bool:
        """Whether the method works on models of ``family`` (a family class). Default: token
        families whose blocks accept any token subset, but not a family whose models have no class
        token for a method that needs one."""
        return issubclass(family, TokenFamily) and family.reducible and not (
            cls.needs_class_token and family.class_token_models is False)

    def supports(self, model: nn.Module) -> bool:
        """Whether this method can be applied to ``model``."""
        try:
            family = get_family(model)
        except TokenSparseError:
            return False
        if not self.supports_family(type(family)):
            return False
        return not (self.needs_class_token and not getattr(family, "has_class_token", False))

    def prepare(self, model: nn.Module, family: Any) -> Callable[[], None]:
        """Check everything and build the method's parts for ``model`` (its ``family`` is one this
        method supports) without changing the model; return the function that installs them.

        :func:`tokensparse.patch` removes a previous method only after this succeeded, so a
        failed ``patch`` leaves the model as it was.
        """
        raise NotImplementedError


class TokenReducer(BlockHook):
    """A reduction step run inside a block after its attention residual (Top-K, ToMe, PPT).

    ``needs`` names the :class:`~tokensparse.families.AttentionExtras` fields it uses;
    ``forward(x, extras, state, block)`` returns the reduced tokens and updates / records the
    :class:`~tokensparse.state.TokenState`.
    """

    @property
    def idle(self) -> bool:
        """True when the reducer removes nothing whatever its input (``r=0``): a block that
        another method may reduce at instead (see :class:`~tokensparse.methods.mix.Mix`)."""
        return False

    def after_attn(self, x: Tensor, extras: AttentionExtras, state: TokenState, block: int) -> Tensor:
        return self(x, extras, state, block)

    def forward(self, x: Tensor, extras: AttentionExtras, state: TokenState, block: int) -> Tensor:
        raise NotImplementedError


class CountReducer(TokenReducer):
    """A reducer that removes up to ``r`` patch tokens in its block (ToMe, ToFu, PiToMe, Zero-TPrune, PPT).

    ``settings`` names the other attributes shown in its repr. :meth:`forward` removes
    :meth:`count` tokens with :meth:`reduce` (nothing when the count is 0) and records the block.
    """
    settings: tuple[str, ...] = ()

    def __init__(self, r: int | None) -> None:
        super().__init__()
        self.r = r

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)}" for k in ("r", *self.settings))

    @property
    def idle(self) -> bool:
        return self.r == 0

    def count(self, n: int) -> int:
        """Tokens removed out of ``n`` patch tokens: ``r``, at most half of them."""
        return max(0, min(self.r or 0, n // 2))

    def reduce(self, x: Tensor, extras: AttentionExtras, state: TokenState, r: int) -> Tensor:
        """Remove ``r`` > 0 patch tokens of ``x`` ``(B, N, C)``, updating ``state``."""
        raise NotImplementedError

    def forward(self, x: Tensor, extras: AttentionExtras, state: TokenState, block: int) -> Tensor:
        r = self.count(x.shape[1] - state.num_prefix)
        if r > 0:
            x = self.reduce(x, extras, state, r)
        state.record(block, x)
        return x


class BlockReducerMethod(Method):
    """A method that reduces tokens inside chosen blocks, after attention (Top-K, ToMe, PPT).

    Subclasses implement :meth:`build_reducers`; ``prop_attn`` turns on proportional attention.
    """
    prop_attn: bool = False

    def use_prop_attn(self) -> None:
        """Check the ``prop_attn`` option and take it (merging methods call it from :meth:`validate`)."""
        self.prop_attn = check_bool(self.config["prop_attn"], "prop_attn")

    def build_reducers(self, depth: int) -> dict[int, TokenReducer]:
        """``{block: reducer}`` for a model of ``depth`` blocks."""
        raise NotImplementedError

    def reducers_for(self, family: Any) -> dict[int, TokenReducer]:
        """``{block: reducer}`` for ``family``'s model: :meth:`build_reducers` of its depth (a method whose
        counts depend on the patch grid overrides this)."""
        return self.build_reducers(family.depth)

    def prepare(self, model: nn.Module, family: Any) -> Callable[[], None]:
        family.check(self.name)
        if self.needs_class_token:
            family.require_class_token(self.name)
        reducers = self.reducers_for(family)
        return lambda: family.install(TokenState(num_prefix=family.num_prefix, prop_attn=self.prop_attn), reducers)


# ----------------------------------------------------------------------------- applying a reduction

def prune_to(x: Tensor, keep: Tensor, state: TokenState) -> Tensor:
    """Keep the tokens ``keep`` ``(B, K)`` (full-sequence indices, prefix first) of ``x``, drop the
    rest; updates ``state`` (sizes gathered, dropped patches mapped to -1)."""
    state.update(keep_assignment(keep, x.shape[1], state.num_prefix),
                 None if state.size is None else gather_tokens(state.size, keep))
    return gather_tokens(x, keep)


def merge_patches(x: Tensor, assign: Tensor, n: int, state: TokenState,
                  pool: Callable[[Tensor, Tensor, Tensor, int], Tensor] | None = None) -> Tensor:
    """Merge the patch tokens of ``x`` ``(B, N, C)`` into ``n`` groups by ``assign`` ``(B, N - P)`` (a patch
    map, every entry in ``0..n-1``); prefix tokens stay first and untouched.

    Each group is the size-weighted average of its members, or ``pool(x, size, assign, n)`` of the patch
    tokens when given; sizes add up. Updates ``state``.
    """
    P = state.num_prefix
    sizes = state.sizes(x)
    xp, size = x[:, P:], sizes[:, P:]
    if pool is not None:
        merged = pool(xp, size, assign, n)
    else:
        merged = sum_tokens(xp * group_weights(size, assign, n).to(x.dtype), assign, n)
    state.update(prefix_assignment(assign, P), torch.cat([sizes[:, :P], sum_tokens(size, assign, n)], dim=1))
    return torch.cat([x[:, :P], merged], dim=1)


def merge_into(x: Tensor, keep: Tensor, src: Tensor, dst: Tensor, state: TokenState) -> Tensor:
    """Keep the patch tokens ``keep`` ``(B, m)`` of ``x`` ``(B, N, C)`` (patch positions, in their new order)
    and merge each patch token ``src`` ``(B, r)`` into the kept one ``dst`` ``(B, r)`` (an index into
    ``keep``): size-weighted averages, sizes add up, every other patch token dropped; prefix tokens stay
    first and untouched. :func:`merge_patches` for a reduction that merges a few tokens into kept ones,
    without passing over every token per group (:func:`~tokensparse.ops.merge_rows`). Updates ``state``.
    """
    P = state.num_prefix
    merged, size = merge_rows(x, state.sizes(x), with_prefix(keep, P), src + P, dst + P)
    state.update(prefix_assignment(group_assignment(x.shape[1] - P, None, keep, src, dst), P), size)
    return merged

"""Per-forward bookkeeping: token sizes, where each original patch went, per-location records."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .ops import size_bias


@dataclass
class LocationInfo:
    """What a reduction location did, for analysis and visualisation (tensors detached).

    Attributes:
        block: block index (0-based) of the location.
        num_prefix: prefix tokens at the front of the sequence (never reduced).
        size: ``(B, N)`` how many original patches each remaining token holds (prefix: 1).
        patch_to_token: ``(B, N0)`` for each original patch, the index of the token that
            now holds it, or -1 if it was dropped.
        extra: method-specific records (e.g. PPT's per-image branch choice).
        grid: ``(H, W)`` of the ``N0`` positions when they are not the model's patch grid
            (e.g. the third stage of a ConvNeXt or Swin), else None.
        stage: index of the stage ``block`` belongs to in a hierarchical model, else None.
    """
    block: int
    num_prefix: int
    size: Tensor
    patch_to_token: Tensor
    extra: dict[str, Any] = field(default_factory=dict)
    grid: tuple[int, int] | None = None
    stage: int | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens remaining after this location, prefix included."""
        return self.size.shape[1]

    @property
    def source(self) -> Tensor:
        """``(B, N, N0)`` bool: ``source[b, j, p]`` is True if token ``j`` holds patch ``p``."""
        _B, _n0 = self.patch_to_token.shape
        tokens = torch.arange(self.num_tokens, device=self.patch_to_token.device)
        return self.patch_to_token.unsqueeze(1) == tokens.view(1, -1, 1)

    @property
    def kept(self) -> Tensor:
        """``(B, N0)`` bool: original patches still represented by some token."""
        return self.patch_to_token >= 0


class TokenState:
    """Mutable state of one forward pass, shared by the patched modules of one model.

    Configuration (kept across passes): ``num_prefix`` prefix tokens never reduced,
    ``prop_attn`` (add ``log(size)`` to attention logits), ``keep_features`` (store the final
    features of each pass in ``features``, for training losses) and ``pool`` (a pooling the
    method asks the model's head for instead of its own: ``"mean"`` of the patch tokens,
    ``"token"``, ``"both"``; None keeps the model's, size-weighted after merging).

    Per pass: ``size`` ``(B, N, 1)`` patches per token (None: all ones), ``patch_to_token``
    ``(B, N0)``, ``locations`` (records), ``policy`` ``(B, N0, 1)`` training keep mask over the
    patches (masks attention and pooling instead of removing tokens), ``masks`` (training
    masks per location, with gradients), ``features`` and the token layout for families
    with position biases: ``grid_positions`` ``(B, k)`` grid index of the tokens after the
    prefix (None: the whole grid in order) followed by ``trailing`` tokens without a position;
    hierarchical families set ``stage`` and ``grid`` ``(H, W)`` while a stage runs; ``pending``: a
    value a block's hook keeps from its attention to the block's end (MCTF merging after the block).
    """

    def __init__(self, num_prefix: int = 0, prop_attn: bool = False, keep_features: bool = False,
                 pool: str | None = None) -> None:
        self.num_prefix = num_prefix
        self.prop_attn = prop_attn
        self.keep_features = keep_features
        self.pool = pool
        self.reset()
        self.active = False

    def reset(self) -> None:
        """Forget the records of the last pass."""
        self.locations: list[LocationInfo] = []
        self.size: Tensor | None = None
        self.patch_to_token: Tensor | None = None
        self.policy: Tensor | None = None
        self.masks: list[Tensor] = []
        self.features: Tensor | None = None
        self.grid_positions: Tensor | None = None
        self.trailing = 0
        self.grid: tuple[int, int] | None = None
        self.stage: int | None = None
        self.pending: Tensor | None = None

    def __deepcopy__(self, memo: dict) -> TokenState:
        """A fresh state with the same configuration: a pass's records (with autograd history) are not copied."""
        new = copy.copy(self)
        new.reset()
        new.active = False
        return new

    def __getstate__(self) -> dict[str, Any]:
        """What pickling keeps (``torch.save`` of a patched model): the configuration, not a pass's records."""
        fresh = TokenState.__new__(TokenState)
        fresh.reset()
        return {**self.__dict__, **fresh.__dict__, "active": False}

    def start(self, x: Tensor) -> None:
        """Begin a forward pass on tokens ``x`` ``(B, N, C)``."""
        B, N, _ = x.shape
        self.reset()
        self.patch_to_token = (torch.arange(N - self.num_prefix, device=x.device) + self.num_prefix).expand(B, -1)
        self.active = True

    def ensure_started(self, x: Tensor) -> None:
        """Start a pass if none is running (called by the first patched block)."""
        if not self.active:
            self.start(x)

    def finish(self) -> None:
        """End the forward pass; the records stay readable until the next one."""
        self.active = False

    def attn_bias(self) -> Tensor | None:
        """``log(size)`` logit bias for proportional attention, or None."""
        if self.prop_attn and self.size is not None:
            return size_bias(self.size)
        return None

    def attn_policy(self) -> Tensor | None:
        """``(B, N)`` training keep mask over the whole sequence (prefix = 1), or None."""
        if self.policy is None:
            return None
        p = self.policy.squeeze(-1)
        return torch.cat([p.new_ones(p.shape[0], self.num_prefix), p], dim=1)

    def sizes(self, x: Tensor) -> Tensor:
        """Current sizes ``(B, N, 1)`` (ones before any merge)."""
        if self.size is None:
            return x.new_ones(x.shape[0], x.shape[1], 1)
        return self.size

    def update(self, assign: Tensor, size: Tensor | None) -> None:
        """Record a reduction: ``assign`` ``(B, N_old)`` maps old to new index (-1: dropped)."""
        padded = torch.cat([assign, assign.new_full((assign.shape[0], 1), -1)], dim=1)
        src = self.patch_to_token.masked_fill(self.patch_to_token < 0, assign.shape[1])
        self.patch_to_token = padded.gather(1, src)
        self.size = size

    def token_map(self) -> Tensor:
        """``(B, N0)``: the index, in the current sequence, of the token holding each original
        patch (-1: none does). The recorded ``patch_to_token``; methods whose sequence differs
        from their records (Evo-ViT inside a stage) override it."""
        return self.patch_to_token

    def record(self, block: int, x: Tensor, **extra: Any) -> None:
        """Store a :class:`LocationInfo` for ``block`` (after its reduction)."""
        size = self.sizes(x)
        self.locations.append(LocationInfo(
            block=block, num_prefix=self.num_prefix, size=size.detach().squeeze(-1),
            patch_to_token=self.patch_to_token.detach(),
            extra={k: v.detach() if isinstance(v, Tensor) else v for k, v in extra.items()},
        ))

    def on_downsample(self, extras: Any, resample: Callable[[Tensor], Tensor]) -> None:
        """Called by hierarchical families after a stage's downsampling.

        ``extras``: the downsampling attention's by-products asked for in
        :attr:`downsample_needs`; ``resample`` maps per-position values ``(B, N_old, ...)``
        of the old grid to the new one. Methods that track per-position values override this.
        """

    downsample_needs: frozenset[str] = frozenset()

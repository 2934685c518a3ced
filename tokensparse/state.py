"""Per-forward bookkeeping: token sizes, where each original patch went, per-location records."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

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
    grid: Optional[tuple[int, int]] = None
    stage: Optional[int] = None

    @property
    def num_tokens(self) -> int:
        """Tokens remaining after this location, prefix included."""
        return self.size.shape[1]

    @property
    def source(self) -> Tensor:
        """``(B, N, N0)`` bool: ``source[b, j, p]`` is True if token ``j`` holds patch ``p``."""
        B, n0 = self.patch_to_token.shape
        tokens = torch.arange(self.num_tokens, device=self.patch_to_token.device)
        return self.patch_to_token.unsqueeze(1) == tokens.view(1, -1, 1)

    @property
    def kept(self) -> Tensor:
        """``(B, N0)`` bool: original patches still represented by some token."""
        return self.patch_to_token >= 0


class TokenState:
    """Mutable state of one forward pass, shared by the patched blocks of one model."""

    def __init__(self, num_prefix: int, prop_attn: bool = False) -> None:
        self.num_prefix = num_prefix
        self.prop_attn = prop_attn
        self.locations: list[LocationInfo] = []
        self.size: Optional[Tensor] = None
        self.patch_to_token: Optional[Tensor] = None
        self.active = False

    def start(self, x: Tensor) -> None:
        """Begin a forward pass on tokens ``x`` ``(B, N, C)``."""
        B, N, _ = x.shape
        n0 = N - self.num_prefix
        self.size = None
        self.patch_to_token = (torch.arange(n0, device=x.device) + self.num_prefix).expand(B, -1)
        self.locations = []
        self.active = True

    def ensure_started(self, x: Tensor) -> None:
        """Start a pass if none is running (called by the first patched block)."""
        if not self.active:
            self.start(x)

    def finish(self) -> None:
        """End the forward pass; the records stay readable until the next one."""
        self.active = False

    def attn_bias(self) -> Optional[Tensor]:
        """``log(size)`` logit bias for proportional attention, or None."""
        if self.prop_attn and self.size is not None:
            return size_bias(self.size)
        return None

    def sizes(self, x: Tensor) -> Tensor:
        """Current sizes ``(B, N, 1)`` (ones before any merge)."""
        if self.size is None:
            return x.new_ones(x.shape[0], x.shape[1], 1)
        return self.size

    def update(self, assign: Tensor, size: Optional[Tensor]) -> None:
        """Record a reduction: ``assign`` ``(B, N_old)`` maps old to new index (-1: dropped)."""
        padded = torch.cat([assign, assign.new_full((assign.shape[0], 1), -1)], dim=1)
        src = self.patch_to_token.masked_fill(self.patch_to_token < 0, assign.shape[1])
        self.patch_to_token = padded.gather(1, src)
        self.size = size

    def record(self, block: int, x: Tensor, **extra: Any) -> None:
        """Store a :class:`LocationInfo` for ``block`` (after its reduction)."""
        size = self.sizes(x)
        self.locations.append(LocationInfo(
            block=block, num_prefix=self.num_prefix, size=size.detach().squeeze(-1),
            patch_to_token=self.patch_to_token.detach(),
            extra={k: v.detach() if isinstance(v, Tensor) else v for k, v in extra.items()},
        ))

"""Model families: one file per family, each implementing the :class:`Family` protocol.

:func:`get_family` finds the family of a model. Adding a family is adding one file with a
class implementing :class:`Family` (a :class:`TokenFamily` or a
:class:`~tokensparse.families.routed.RoutedFamily` subclass) and listing it in
:data:`FAMILIES`; see ``docs/architecture.md``.
"""
from __future__ import annotations

from torch import nn

from ..errors import TokenSparseError
from .base import (
    HOOK,
    SLOT,
    AttentionExtras,
    BlockHook,
    Family,
    Slot,
    TokenFamily,
    attach,
    block_hook,
    ensure_slot,
    model_state,
    restore,
    slot,
    swap_class,
)
from .convnext import ConvNeXtFamily
from .levit import LevitFamily
from .routed import Route, RoutedFamily
from .swin import SwinFamily
from .vit import ViTFamily

FAMILIES: tuple[type, ...] = (ViTFamily, ConvNeXtFamily, SwinFamily, LevitFamily)
"""Every supported family, in the order :func:`get_family` tries them."""


def get_family(model: nn.Module) -> TokenFamily | RoutedFamily:
    """The :class:`Family` of ``model`` (bound to it), or a clear error naming the supported ones."""
    for family in FAMILIES:
        if family.matches(model):
            return family(model)
    supported = "; ".join(f"{f.name}: {f.description}" for f in FAMILIES)
    raise TokenSparseError(f"model family not supported: {type(model).__name__}. Supported: {supported}")


__all__ = [
    "FAMILIES",
    "HOOK",
    "SLOT",
    "AttentionExtras",
    "BlockHook",
    "ConvNeXtFamily",
    "Family",
    "LevitFamily",
    "Route",
    "RoutedFamily",
    "Slot",
    "SwinFamily",
    "TokenFamily",
    "ViTFamily",
    "attach",
    "block_hook",
    "ensure_slot",
    "get_family",
    "model_state",
    "restore",
    "slot",
    "swap_class",
]

"""Model families: one file per family, each implementing the :class:`Family` protocol.

:func:`get_family` finds the family of a model. Adding a family is adding one file with a
class implementing :class:`Family` (a :class:`TokenFamily` or a
:class:`~tokensparse.families.routed.RoutedFamily` subclass) and listing it in
:data:`FAMILIES`; see ``docs/architecture.md``.

Hugging Face ``transformers`` families are declared in ``hf.py`` (no transformers import)
and implemented in ``hf_*.py``, which :func:`get_family` imports only for a transformers
model: ``import tokensparse`` does not import transformers.
"""
from __future__ import annotations

from torch import nn

from ..errors import TokenSparseError
from .base import (
    HOOK,
    SLOT,
    AheadMerge,
    AttentionExtras,
    BlockHook,
    Family,
    Slot,
    TimmParts,
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
from .hf import HF_FAMILIES, HFFamily, hf_family, is_transformers_model
from .levit import LevitFamily
from .routed import Route, RoutedFamily
from .swin import SwinFamily
from .vit import ViTFamily

FAMILIES: tuple[type, ...] = (ViTFamily, ConvNeXtFamily, SwinFamily, LevitFamily, *HF_FAMILIES)
"""Every supported family, in the order :func:`get_family` tries them (the transformers families
as their declarations, whose implementing modules load on first use)."""


def wrapper_error(model: object) -> TokenSparseError | None:
    """The error for what is not a model to patch but holds one (a compiled model, a DataParallel
    wrapper, a CLIP / SigLIP model whose vision tower is the model), or is no module; else None."""
    if not isinstance(model, nn.Module):
        return TokenSparseError(f"model must be a torch.nn.Module, got a {type(model).__name__}")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return TokenSparseError("this model is compiled (torch.compile): patch the model before compiling it, "
                                "tokensparse.patch(model, ...) then torch.compile(model)")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return TokenSparseError(f"this is a {type(model).__name__} wrapper: patch the model inside it, "
                                f"tokensparse.patch(wrapper.module, ...)")
    if is_transformers_model(model) and not any(f.matches(model) for f in HF_FAMILIES):
        tower = getattr(model, "vision_model", None)
        if isinstance(tower, nn.Module) and any(f.matches(tower) for f in HF_FAMILIES):
            return TokenSparseError(f"a {type(model).__name__} holds text and vision towers: patch its vision tower, "
                                    f"tokensparse.patch(model.vision_model, ...)")
    return None


def get_family(model: nn.Module) -> TokenFamily | RoutedFamily:
    """The :class:`Family` of ``model`` (bound to it), or a clear error naming the supported ones.

    A model whose class comes from ``transformers`` gets its family from the matching
    ``hf_*.py`` module, imported here on first use (:func:`~tokensparse.families.hf.hf_family`).
    """
    wrapped = wrapper_error(model)
    if wrapped is not None:
        raise wrapped
    if is_transformers_model(model):
        return hf_family(model)
    for family in FAMILIES:
        if family.matches(model):
            return family(model)
    supported = "; ".join(f"{f.name}: {f.description}" for f in FAMILIES)
    raise TokenSparseError(f"model family not supported: {type(model).__name__}. Supported: {supported}")


__all__ = [
    "FAMILIES",
    "HOOK",
    "SLOT",
    "AheadMerge",
    "AttentionExtras",
    "BlockHook",
    "ConvNeXtFamily",
    "Family",
    "HFFamily",
    "LevitFamily",
    "Route",
    "RoutedFamily",
    "Slot",
    "SwinFamily",
    "TimmParts",
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
    "wrapper_error",
]

"""Model-family patches and the public ``patch`` / ``unpatch`` / ``info`` entry points."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import TokenSparseError
from ..state import LocationInfo
from .base import restore_classes

SUPPORTED_FAMILIES = {"vit": "timm VisionTransformer (ViT, DeiT, distilled DeiT, AugReg, register-token ViTs)"}


def model_family(model: nn.Module) -> str:
    """The family name of a timm model (``"vit"``), or a clear error naming the supported ones."""
    from timm.models.vision_transformer import VisionTransformer
    if isinstance(model, VisionTransformer):
        return "vit"
    supported = "; ".join(f"{k}: {v}" for k, v in SUPPORTED_FAMILIES.items())
    raise TokenSparseError(f"model family not supported: {type(model).__name__}. Supported: {supported}")


def patch(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Reduce ``model`` in place with ``method`` and return it.

    Args:
        model: a timm model of a supported family.
        method: a method name or spec string ``"NAME:key=value,..."`` (see :func:`tokensparse.methods`).
        **options: method options; they override options given in the spec string.

    A model that is already patched is first restored, so the last ``patch`` wins.
    """
    from ..methods import get_method
    from ..spec import parse_spec
    name, spec_options = parse_spec(method)
    cls = get_method(name)
    instance = cls(**{**spec_options, **options})
    family = model_family(model)
    if family not in cls.families:
        raise TokenSparseError(
            f"method '{name}' does not support {family} models; it supports: {', '.join(cls.families)}")
    if is_patched(model):
        unpatch(model)
    instance.apply(model)
    model.__dict__["_ts_method"] = instance
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original classes and remove everything :func:`patch` added."""
    method = model.__dict__.pop("_ts_method", None)
    if method is not None:
        method.remove(model)
    restore_classes(model)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` currently carries a tokensparse method."""
    return "_ts_method" in model.__dict__


def patched_method(model: nn.Module):
    """The method instance installed on ``model`` (its ``name`` and ``config``), or None."""
    return model.__dict__.get("_ts_method")


def info(model: nn.Module) -> list[LocationInfo]:
    """Per-location records of the last forward pass of a patched model."""
    state = model.__dict__.get("_ts_state")
    if state is None:
        raise TokenSparseError("model is not patched with a tokensparse method (call tokensparse.patch first)")
    return list(state.locations)

"""Model-family patches and the public ``patch`` / ``unpatch`` / ``info`` entry points."""
from __future__ import annotations

from types import ModuleType
from typing import Any

from torch import nn

from ..errors import TokenSparseError
from ..state import LocationInfo
from .base import restore_classes

SUPPORTED_FAMILIES = {
    "vit": "timm VisionTransformer (ViT, DeiT, distilled DeiT, AugReg, register-token ViTs)",
    "convnext": "timm ConvNeXt (v1), full or features_only",
    "swin": "timm SwinTransformer (v1), full or features_only",
    "levit": "timm Levit (levit_* and levit_conv_*)",
}


def _wraps(model: nn.Module, stage_cls: type) -> bool:
    """Whether ``model`` is a timm ``features_only`` wrapper around stages of ``stage_cls``."""
    from timm.models._features import FeatureDictNet, FeatureGetterNet
    if not isinstance(model, (FeatureDictNet, FeatureGetterNet)):
        return False
    return any(isinstance(m, stage_cls) for m in model.modules())


def model_family(model: nn.Module) -> str:
    """The family name of a timm model (see ``SUPPORTED_FAMILIES``), or a clear error naming them."""
    from timm.models.convnext import ConvNeXt, ConvNeXtStage
    from timm.models.levit import Levit
    from timm.models.swin_transformer import SwinTransformer, SwinTransformerStage
    from timm.models.vision_transformer import VisionTransformer
    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, ConvNeXt) or _wraps(model, ConvNeXtStage):
        return "convnext"
    if isinstance(model, SwinTransformer) or _wraps(model, SwinTransformerStage):
        return "swin"
    if isinstance(model, Levit):
        return "levit"
    supported = "; ".join(f"{k}: {v}" for k, v in SUPPORTED_FAMILIES.items())
    raise TokenSparseError(f"model family not supported: {type(model).__name__}. Supported: {supported}")


def family_module(model: nn.Module) -> ModuleType:
    """The patch module of ``model``'s family (``tokensparse.patch.vit``, ``.convnext``, ``.swin``)."""
    import importlib
    return importlib.import_module(f"{__name__}.{model_family(model)}")


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

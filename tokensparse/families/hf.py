"""Hugging Face ``transformers`` vision models: the families, declared without importing transformers.

Each declaration names the transformers classes of one family and the module that
implements it (``hf_vit.py``, ``hf_dinov2.py``, ``hf_clip.py``, ``hf_siglip.py``, all built
on ``hf_base.py``). :func:`tokensparse.families.get_family` loads that module only for a
model whose class comes from ``transformers``, so ``import tokensparse`` never imports
transformers (an optional dependency: ``pip install "tokensparse[hf]"``), while
:data:`~tokensparse.families.FAMILIES` and ``tokensparse.list_methods()`` still list these
families by class.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn

from ..errors import TokenSparseError, first_line
from .base import TokenFamily

SUPPORTED_TRANSFORMERS = "transformers>=5,<6"
"""The transformers versions whose module layout the HF families know (the ``hf`` extra)."""
TESTED_TRANSFORMERS = "5.24.0"
"""The version the tests run with (``constraints.txt``)."""


def transformers_class(model: nn.Module) -> type | None:
    """The class from ``transformers`` that ``model`` is an instance of (the first in its MRO: the
    original class of a patched model, the parent of a user subclass), or None."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls
    return None


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is (a subclass of) a ``transformers`` class."""
    return transformers_class(model) is not None


class HFFamily(TokenFamily):
    """A family of ``transformers`` vision encoders, declared by class name.

    A declaration is a subclass with keywords (:meth:`__init_subclass__`); ``classes`` maps each
    supported transformers class name to the attribute path of its vision encoder (``""``: the model
    itself, ``"vit"``: ``model.vit``); ``module`` is the file implementing the family, whose
    ``FAMILY`` subclasses this declaration.
    """
    module: ClassVar[str] = ""
    classes: ClassVar[dict[str, str]] = {}
    pools: ClassVar[tuple[str, ...]] = ("model",)
    merges_ahead: ClassVar[bool] = True

    def __init_subclass__(cls, family: str | None = None, classes: dict[str, str] | None = None,
                          class_token: bool | None = None, note: str = "", **kwargs: Any) -> None:
        """Declare a family ``family`` (e.g. ``"hf-vit"``) of the transformers ``classes`` (see the class
        docstring); ``class_token``: whether its models have one (None: some do); ``note`` ends the
        description, which lists the classes. Implemented in ``tokensparse.families.<family with _>``."""
        super().__init_subclass__(**kwargs)
        if family is None:  # an implementation subclassing a declaration
            return
        cls.name, cls.classes, cls.class_token_models = family, dict(classes or {}), class_token
        cls.module = f"tokensparse.families.{family.replace('-', '_')}"
        cls.description = f"Hugging Face transformers {', '.join(cls.classes)}{note}"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        found = transformers_class(model)
        return found is not None and found.__name__ in cls.classes

    @classmethod
    def implementation(cls) -> type[HFFamily]:
        """The class implementing this family (imports its module, and with it transformers)."""
        try:
            module = importlib.import_module(cls.module)
        except ImportError as exc:  # a transformers whose modules moved
            raise TokenSparseError(
                f"the {cls.name} family needs {SUPPORTED_TRANSFORMERS} (tested with {TESTED_TRANSFORMERS}): "
                f"{exc}") from None
        return module.FAMILY

    @property
    def head_pools_tokens(self) -> bool:
        """transformers models have their own heads (pooling is size-weighted where they average tokens)."""
        return False


class HFViTFamily(HFFamily, family="hf-vit", class_token=True, classes={
        "ViTModel": "", "ViTForImageClassification": "vit", "DeiTModel": "", "DeiTForImageClassification": "deit",
        "DeiTForImageClassificationWithTeacher": "deit"}):
    """transformers ViT and DeiT."""


class HFDinov2Family(HFFamily, family="hf-dinov2", class_token=True, classes={
        "Dinov2Model": "", "Dinov2ForImageClassification": "dinov2", "Dinov2WithRegistersModel": "",
        "Dinov2WithRegistersForImageClassification": "dinov2_with_registers"}):
    """transformers DINOv2, with or without registers."""


class HFCLIPFamily(HFFamily, family="hf-clip", class_token=True, note=(
        " (a CLIPModel's vision_model is a CLIPVisionModel)"), classes={
        "CLIPVisionModel": "", "CLIPVisionModelWithProjection": "vision_model",
        "CLIPForImageClassification": "vision_model"}):
    """transformers CLIP vision towers."""


class HFSiglipFamily(HFFamily, family="hf-siglip", class_token=False, note=(
        " (a SiglipModel's vision_model is a SiglipVisionModel); no class token"),
        classes={"SiglipVisionModel": "", "SiglipForImageClassification": "vision_model"}):
    """transformers SigLIP vision towers."""


HF_FAMILIES: tuple[type[HFFamily], ...] = (HFViTFamily, HFDinov2Family, HFCLIPFamily, HFSiglipFamily)
"""Every transformers family, declared (their modules load on first use)."""


INTERPOLATIONS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
"""PIL resampling filters (what image processors store) by timm interpolation name."""


def _height_width(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, Mapping) and value.get("height") and value.get("width"):
        return int(value["height"]), int(value["width"])
    return None


def _crop_pct(crop: int, scale: int) -> float:
    """The timm ``crop_pct`` that makes timm resize to ``scale`` before cropping ``crop`` (timm floors
    ``crop / crop_pct``, so the exact ratio may land one pixel short)."""
    pct = crop / scale
    return pct if math.floor(crop / pct) == scale else crop / (scale + 0.5)


def processor_data_config(settings: Mapping[str, Any]) -> dict[str, Any]:
    """timm-style data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``,
    ``crop_mode``) doing what a transformers image processor does, from its settings
    (``preprocessor_config.json``): resize to a height and width (squash) or the shortest edge,
    centre crop, rescale by 1/255, normalise. Other settings are a clear error."""
    def refuse(what: str) -> TokenSparseError:
        return TokenSparseError(f"unsupported image processor settings ({what}); supported: resize to height/width "
                                f"or shortest_edge, optional centre crop, rescale 1/255, normalise")
    if not settings.get("do_resize", True):
        raise refuse("do_resize is false")
    if settings.get("do_rescale", True) is False or not math.isclose(settings.get("rescale_factor", 1 / 255), 1 / 255):
        raise refuse(f"rescale {settings.get('do_rescale')}, factor {settings.get('rescale_factor')}")
    resample = settings.get("resample", 2)
    interpolation = INTERPOLATIONS.get(int(getattr(resample, "value", resample)))
    if interpolation is None:
        raise refuse(f"resample {resample!r}")
    size = settings.get("size")
    crop = _height_width(settings.get("crop_size")) if settings.get("do_center_crop") else None
    squash = _height_width(size)
    if squash is not None:
        h, w = squash
        ch, cw = crop or squash
        if ch > h or cw > w or not math.isclose(ch / h, cw / w, rel_tol=1e-3):
            raise refuse(f"resize to {h}x{w} then crop {ch}x{cw}")
        mode, pct = "squash", _crop_pct(ch, h)
    elif isinstance(size, Mapping) and size.get("shortest_edge"):
        edge = int(size["shortest_edge"])
        if crop is None and settings.get("crop_pct"):  # ConvNeXt's processor: crop the edge from edge / crop_pct
            ch = cw = edge
            pct = float(settings["crop_pct"])
        elif crop is not None and crop[0] == crop[1] and crop[0] <= edge:
            ch, cw = crop
            pct = _crop_pct(ch, edge)
        else:
            raise refuse(f"shortest edge {edge} with crop {crop}")
        mode = "center"
    else:
        raise refuse(f"size {size!r}")
    normalise = settings.get("do_normalize", True)
    mean = tuple(float(v) for v in settings.get("image_mean", (0.0,) * 3)) if normalise else (0.0,) * 3
    std = tuple(float(v) for v in settings.get("image_std", (1.0,) * 3)) if normalise else (1.0,) * 3
    return {"input_size": (3, ch, cw), "interpolation": interpolation, "mean": mean, "std": std,
            "crop_pct": pct, "crop_mode": mode}


def hf_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` the transformers ``model`` is configured for (its vision config's ``image_size``)."""
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", None) or config
    size = getattr(config, "image_size", None)
    if size is None:
        raise TokenSparseError(f"cannot tell the input size of this {type(model).__name__}: its config has no image_size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(getattr(config, "num_channels", 3)), int(h), int(w)


def hf_data_config(model: nn.Module) -> dict[str, Any]:
    """The preprocessing of a transformers ``model`` as a timm-style data config
    (:func:`processor_data_config`), from the image processor saved where the model was loaded from
    (``preprocessor_config.json`` next to its ``config.json``, or the same hub id)."""
    source = getattr(getattr(model, "config", None), "_name_or_path", "")
    if not source:
        raise TokenSparseError(
            f"this {type(model).__name__} was not loaded with from_pretrained, so its image preprocessing is "
            f"unknown: save the model and its image processor (save_pretrained) in one folder and load that")
    from transformers import AutoImageProcessor
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise TokenSparseError(f"cannot read the image processor (preprocessor_config.json) of {source!r}: "
                               f"{first_line(exc)}") from None
    return processor_data_config(processor.to_dict())


def hf_family(model: nn.Module) -> HFFamily:
    """The family of a transformers ``model``, bound to it, or a clear error naming the supported classes."""
    for declared in HF_FAMILIES:
        if declared.matches(model):
            return declared.implementation()(model)
    found = transformers_class(model)
    supported = ", ".join(name for f in HF_FAMILIES for name in f.classes)
    raise TokenSparseError(
        f"transformers model {found.__name__ if found else type(model).__name__} is not supported; supported "
        f"transformers classes ({SUPPORTED_TRANSFORMERS}): {supported}")


__all__ = [
    "HF_FAMILIES",
    "SUPPORTED_TRANSFORMERS",
    "TESTED_TRANSFORMERS",
    "HFCLIPFamily",
    "HFDinov2Family",
    "HFFamily",
    "HFSiglipFamily",
    "HFViTFamily",
    "hf_data_config",
    "hf_family",
    "hf_input_size",
    "is_transformers_model",
    "processor_data_config",
    "transformers_class",
]

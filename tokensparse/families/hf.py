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
from typing import ClassVar

from torch import nn

from ..errors import TokenSparseError
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

    ``classes`` maps each supported transformers class name to the attribute path of its
    vision encoder (``""``: the model itself, ``"vit"``: ``model.vit``); ``module`` is the
    file implementing the family, whose ``FAMILY`` subclasses this declaration.
    """
    module: ClassVar[str] = ""
    classes: ClassVar[dict[str, str]] = {}
    pools: ClassVar[tuple[str, ...]] = ("model",)

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


class HFViTFamily(HFFamily):
    name = "hf-vit"
    description = ("Hugging Face transformers ViTModel, ViTForImageClassification, DeiTModel, "
                   "DeiTForImageClassification, DeiTForImageClassificationWithTeacher")
    module = "tokensparse.families.hf_vit"
    classes: ClassVar[dict[str, str]] = {"ViTModel": "", "ViTForImageClassification": "vit", "DeiTModel": "",
               "DeiTForImageClassification": "deit", "DeiTForImageClassificationWithTeacher": "deit"}


class HFDinov2Family(HFFamily):
    name = "hf-dinov2"
    description = ("Hugging Face transformers Dinov2Model, Dinov2ForImageClassification, Dinov2WithRegistersModel, "
                   "Dinov2WithRegistersForImageClassification")
    module = "tokensparse.families.hf_dinov2"
    classes: ClassVar[dict[str, str]] = {"Dinov2Model": "", "Dinov2ForImageClassification": "dinov2", "Dinov2WithRegistersModel": "",
               "Dinov2WithRegistersForImageClassification": "dinov2_with_registers"}


class HFCLIPFamily(HFFamily):
    name = "hf-clip"
    description = ("Hugging Face transformers CLIPVisionModel, CLIPVisionModelWithProjection, "
                   "CLIPForImageClassification (a CLIPModel's vision_model is a CLIPVisionModel)")
    module = "tokensparse.families.hf_clip"
    classes: ClassVar[dict[str, str]] = {"CLIPVisionModel": "", "CLIPVisionModelWithProjection": "vision_model",
               "CLIPForImageClassification": "vision_model"}


class HFSiglipFamily(HFFamily):
    name = "hf-siglip"
    description = ("Hugging Face transformers SiglipVisionModel, SiglipForImageClassification (a SiglipModel's "
                   "vision_model is a SiglipVisionModel); no class token")
    module = "tokensparse.families.hf_siglip"
    classes: ClassVar[dict[str, str]] = {"SiglipVisionModel": "", "SiglipForImageClassification": "vision_model"}


HF_FAMILIES: tuple[type[HFFamily], ...] = (HFViTFamily, HFDinov2Family, HFCLIPFamily, HFSiglipFamily)
"""Every transformers family, declared (their modules load on first use)."""


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
    "hf_family",
    "is_transformers_model",
    "transformers_class",
]

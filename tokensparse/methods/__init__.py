"""Token reduction methods, one file each, holding only their policy; the registry by name."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import TokenSparseError
from ..families import FAMILIES
from .base import Method
from .diffrate import DiffRate
from .dynamicvit import DynamicViT
from .evovit import EvoViT
from .mctf import MCTF
from .mix import Mix
from .options import OptionInfo
from .pitome import PiToMe
from .ppt import PPT
from .tofu import ToFu
from .tome import ToMe
from .topk import EViT, TopK
from .zerotprune import ZeroTPrune

REGISTRY: dict[str, type[Method]] = {m.name: m for m in (TopK, EViT, ToMe, MCTF, ToFu, PiToMe, DiffRate, ZeroTPrune, PPT, EvoViT,
                                                   DynamicViT, Mix)}
Mix.registry = REGISTRY


@dataclass(frozen=True)
class MethodInfo:
    """A method's name, one-line summary, options (with defaults) and supported families."""
    name: str
    summary: str
    options: tuple[OptionInfo, ...]
    families: tuple[str, ...]
    needs_training: bool = False

    def supports(self, model: nn.Module) -> bool:
        """Whether the method applies to ``model`` at its defaults."""
        return get_method(self.name)().supports(model)


def get_method(name: str) -> type[Method]:
    """The method class called ``name``, or an error listing the valid names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise TokenSparseError(f"unknown method {name!r}; valid methods: {', '.join(REGISTRY)}") from None


def supported_families(method: type[Method]) -> tuple[str, ...]:
    """Names of the families ``method`` works on."""
    return tuple(f.name for f in FAMILIES if method.supports_family(f))


def method_info(method: type[Method]) -> MethodInfo:
    """The :class:`MethodInfo` of a method class."""
    return MethodInfo(method.name, method.summary, method.options, supported_families(method), method.needs_training)


__all__ = ["REGISTRY", "Method", "MethodInfo", "OptionInfo", "get_method", "method_info", "supported_families"]

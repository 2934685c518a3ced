"""The method registry: every method by name, with its options and defaults."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import TokenSparseError
from .base import Method, OptionInfo
from .dynamicvit import DynamicViT
from .evovit import EvoViT
from .ppt import PPT
from .tome import ToMe
from .topk import EViT, TopK

REGISTRY: dict[str, type[Method]] = {m.name: m for m in (TopK, EViT, ToMe, PPT, EvoViT, DynamicViT)}


@dataclass(frozen=True)
class MethodInfo:
    """A method's name, one-line summary, options (with defaults) and supported families."""
    name: str
    summary: str
    options: tuple[OptionInfo, ...]
    families: tuple[str, ...]

    def supports(self, model: nn.Module) -> bool:
        """Whether the method applies to ``model`` at its defaults."""
        return get_method(self.name)().supports(model)


def get_method(name: str) -> type[Method]:
    """The method class called ``name``, or an error listing the valid names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise TokenSparseError(f"unknown method {name!r}; valid methods: {', '.join(REGISTRY)}") from None


def methods() -> list[MethodInfo]:
    """Every method with its options, defaults and a one-line description."""
    return [MethodInfo(m.name, m.summary, m.options, m.families) for m in REGISTRY.values()]

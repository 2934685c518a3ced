"""Class swapping that can be undone exactly."""
from __future__ import annotations

from torch import nn

_ORIGINAL = "_ts_original_class"


def swap_class(module: nn.Module, mixin: type) -> None:
    """Give ``module`` a subclass of its class with ``mixin``'s methods, remembering the original.

    ``mixin`` is a subclass of a timm class (e.g. ``ReducedBlock(Block)``); the module keeps
    its own class's behaviour for everything ``mixin`` does not override.
    """
    original = type(module)
    if _ORIGINAL in module.__dict__:
        original = module.__dict__[_ORIGINAL]
    if issubclass(original, mixin):
        new_cls = original
    elif original in mixin.__mro__:
        new_cls = mixin
    else:
        new_cls = type(f"{mixin.__name__}_{original.__name__}", (mixin, original), {})
    module.__dict__[_ORIGINAL] = original
    module.__class__ = new_cls


def restore_classes(model: nn.Module) -> None:
    """Put back every original class swapped by :func:`swap_class` under ``model``."""
    for module in model.modules():
        original = module.__dict__.pop(_ORIGINAL, None)
        if original is not None:
            module.__class__ = original

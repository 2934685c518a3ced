"""The public API: :func:`patch`, :func:`unpatch`, :func:`is_patched`, :func:`list_methods`,
:func:`location_records` (re-exported from :mod:`tokensparse`)."""
from __future__ import annotations

from typing import Any

from torch import nn

from .errors import TokenSparseError
from .families import ensure_slot, get_family, model_state, restore, slot
from .methods import REGISTRY, Method, MethodInfo, get_method, method_info, supported_families
from .spec import parse_spec
from .state import LocationInfo, TokenState


def patch(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Reduce ``model`` in place with ``method`` and return it.

    Args:
        model: a model of a supported family (see :data:`tokensparse.families.FAMILIES`).
        method: a method name or spec string ``"NAME:key=value,..."`` (see :func:`list_methods`).
        **options: method options; they override options given in the spec string.

    A model that is already patched is first restored, so the last ``patch`` wins. Everything
    is checked before the model changes: a failed ``patch`` leaves it as it was (with its
    previous method, if any).
    """
    name, spec_options = parse_spec(method)
    cls = get_method(name)
    instance = cls(**{**spec_options, **options})
    family = get_family(model)
    if not cls.supports_family(type(family)):
        why = f" (it needs a class token, and {family.name} models have no class token)" \
            if getattr(family, "class_token_models", None) is False else ""
        raise TokenSparseError(
            f"method '{name}' does not support {family.name} models{why}; it supports: "
            f"{', '.join(supported_families(cls))}")
    install = instance.prepare(model, family)  # may raise: the model is untouched so far
    if is_patched(model):
        unpatch(model)
    try:
        install()
    except BaseException:
        restore(model)
        raise
    ensure_slot(model).config["method"] = instance
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original classes and remove everything :func:`patch` added."""
    restore(model)
    return model


def patched_method(model: nn.Module) -> Method | None:
    """The method instance installed on ``model`` (its ``name`` and ``config``), or None."""
    if not isinstance(model, nn.Module):
        return None
    s = slot(model)
    return None if s is None else s.config.get("method")


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` currently carries a tokensparse method."""
    return patched_method(model) is not None


def token_state(model: nn.Module) -> TokenState:
    """The :class:`~tokensparse.state.TokenState` of a patched model (its last pass's records)."""
    if not isinstance(model, nn.Module):
        raise TokenSparseError(f"model must be a torch.nn.Module, got a {type(model).__name__}")
    state = model_state(model)
    if state is None:
        raise TokenSparseError("model is not patched with a tokensparse method (call tokensparse.patch first)")
    return state


def location_records(model: nn.Module) -> list[LocationInfo]:
    """Per-location records of the last forward pass of a patched model."""
    return list(token_state(model).locations)


info = location_records
"""Old name of :func:`location_records`."""


def list_methods() -> list[MethodInfo]:
    """Every method with its options, defaults, supported families and a one-line description."""
    return [method_info(m) for m in REGISTRY.values()]

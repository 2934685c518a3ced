"""Create timm models, optionally loading a local weights file, with clear errors."""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from .errors import TokenSparseError

_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")
_MAX_LISTED = 5


def suggest_models(name: str, n: int = _MAX_LISTED) -> list[str]:
    """Names of timm architectures (or pretrained tags) close to ``name``."""
    arch, _, _ = name.partition(".")
    candidates = timm.list_models()
    if "." in name:
        candidates = timm.list_pretrained(f"{arch}.*") or candidates
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    if len(close) < n:
        pattern = f"*{arch}*" if "*" not in arch else arch
        close += [c for c in fnmatch.filter(candidates, pattern) if c not in close]
    return close[:n]


def _unknown_model(name: str, detail: str = "") -> TokenSparseError:
    hints = suggest_models(name)
    msg = f"unknown model {name!r}"
    if detail:
        msg += f" ({detail})"
    if hints:
        msg += "; did you mean: " + ", ".join(hints) + "?"
    return TokenSparseError(msg)


def _check_name(name: str) -> None:
    """Raise TokenSparseError unless ``name`` is a timm architecture (with a valid tag)."""
    if not isinstance(name, str) or not name.strip():
        raise TokenSparseError(f"model name must be a non-empty string, got {name!r}")
    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        raise _unknown_model(name)
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        raise _unknown_model(name, f"{arch} has no pretrained tag {tag!r}")


def _read_checkpoint(path: Path) -> Any:
    """Read a .safetensors or torch checkpoint file; TokenSparseError if unreadable."""
    errors: list[str] = []
    readers = [("as safetensors", _read_safetensors), ("as torch checkpoint", _read_torch)]
    if path.suffix.lower() != ".safetensors":
        readers.reverse()
    for label, reader in readers:
        try:
            return reader(path)
        except Exception as exc:  # noqa: BLE001 - any failure means "unreadable"
            errors.append(f"{label}: {_first_line(exc)}")
    raise TokenSparseError(
        f"could not read weights file {str(path)!r}: not a valid checkpoint "
        f"({'; '.join(errors)})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file onto the CPU."""
    return load_file(str(path), device="cpu")


def _read_torch(path: Path) -> Any:
    """Read a torch checkpoint (tensors only, no arbitrary pickles)."""
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap ``{"model": ...}`` / ``{"state_dict": ...}`` and strip a DDP ``module.`` prefix."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _STATE_DICT_KEYS
                      if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(v, torch.Tensor) for v in obj.values()):
        raise TokenSparseError(
            f"weights file {str(path)!r} holds no state dict (expected a mapping of parameter "
            f"names to tensors, possibly under a 'model' or 'state_dict' key)")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _short_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def describe_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """Human-readable key/shape differences between a model and a state dict ('' if none)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_short_list(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_short_list(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches ({_short_list(shapes)})")
    return "; ".join(parts)


def load_weights(model: nn.Module, weights: str | Path, model_name: str = "model") -> nn.Module:
    """Load a local checkpoint into ``model`` with ``strict=True``; TokenSparseError on mismatch."""
    path = Path(weights).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise TokenSparseError(f"weights file {str(path)!r} {what}")
    state = _extract_state_dict(_read_checkpoint(path), path)
    mismatch = describe_mismatch(model, state)
    if mismatch:
        raise TokenSparseError(
            f"weights file {str(path)!r} does not match model {model_name!r}: {mismatch}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TokenSparseError(
            f"weights file {str(path)!r} does not fit model {model_name!r}: "
            f"{_first_line(exc)}") from None
    return model


def create_model(name: str, weights: str | Path | None = None, pretrained: bool = False,
                 **kwargs: Any) -> nn.Module:
    """Create the timm model ``name`` in eval mode.

    ``weights``: a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file loaded with
    ``strict=True``. ``pretrained``: timm's own download (needs a reachable model hub);
    giving both is an error. The model keeps timm's pretrained config for
    ``name``, so ``timm.data.resolve_data_config({}, model=model)`` gives its preprocessing.
    """
    _check_name(name)
    if weights is not None and pretrained:
        raise TokenSparseError("give either a weights file or pretrained=True, not both")
    try:
        model = timm.create_model(name, pretrained=pretrained and weights is None, **kwargs)
    except TypeError as exc:
        raise TokenSparseError(f"bad option for model {name!r}: {exc}") from None
    except (OSError, RuntimeError, ValueError) as exc:
        if not pretrained:
            raise
        raise TokenSparseError(
            f"could not get pretrained weights for {name!r} ({_first_line(exc)}); "
            f"pass a local weights file instead") from None
    if weights is not None:
        load_weights(model, weights, name)
    return model.eval()

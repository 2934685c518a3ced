"""Create timm models (optionally loading a local weights file) and transformers models
(``hf:PATH_OR_ID``), with clear errors."""
from __future__ import annotations

import difflib
import fnmatch
import os
import re
import socket
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file
from torch import nn

from .errors import TokenSparseError, first_line

_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")
_MAX_LISTED = 5
HUB_PROBE_TIMEOUT = 3.0
"""Seconds :func:`hub_unreachable` waits for a connection before calling a hub unreachable."""
_HUB_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
_TRUE = {"1", "ON", "YES", "TRUE"}


def suggest_models(name: str, n: int = _MAX_LISTED) -> list[str]:
    """Names of timm architectures (or pretrained tags) close to ``name``: those that start with
    it (shortest first, so ``vit_tiny`` suggests ``vit_tiny_patch16_224``), then similar ones."""
    arch, _, _ = name.partition(".")
    candidates = timm.list_models()
    if "." in name:
        candidates = timm.list_pretrained(f"{arch}.*") or candidates
    prefix = "" if "*" in name else name
    ranked = sorted((c for c in candidates if prefix and c.startswith(prefix)), key=lambda c: (len(c), c))
    ranked += [c for c in difflib.get_close_matches(name, candidates, n=n, cutoff=0.6) if c not in ranked]
    if len(ranked) < n:
        pattern = f"*{arch}*" if "*" not in arch else arch
        ranked += [c for c in fnmatch.filter(candidates, pattern) if c not in ranked]
    return ranked[:n]


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
            errors.append(f"{label}: {first_line(exc)}")
    raise TokenSparseError(
        f"could not read weights file {str(path)!r}: not a valid checkpoint "
        f"({'; '.join(errors)})")


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
            f"{describe_load_error(exc)}") from None
    return model


def describe_load_error(exc: BaseException) -> str:
    """One line from a ``load_state_dict`` error, naming the keys (at most 5 per kind).

    torch puts the missing / unexpected keys and size mismatches on the lines after its
    first ("Error(s) in loading state_dict for X:"); those lines are kept, each key list
    shortened, so the message never stops before naming them.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    details = [_shorten_keys(ln) for ln in lines[1:]] if lines[0].startswith("Error(s) in loading") else []
    return "; ".join(details) if details else " ".join(lines)


def _shorten_keys(line: str) -> str:
    """``Missing key(s) in state_dict: "a", "b", ...`` with at most :data:`_MAX_LISTED` keys named."""
    head, sep, rest = line.partition(": ")
    keys = re.findall(r'"([^"]*)"', rest) if sep else []
    if not keys:
        return line.rstrip(". ")
    return f"{head} ({len(keys)}): {_short_list(keys)}"


HF_PREFIX = "hf:"
"""Model names starting with this load a transformers model: ``hf:PATH`` (a ``save_pretrained``
folder) or ``hf:ORG/NAME`` (a model hub id)."""


def load_hf_model(source: str) -> nn.Module:
    """The transformers model saved in folder ``source`` (or hub id), eval mode, SDPA attention.

    The class is the one ``config.json`` names (``architectures``), e.g. ``ViTForImageClassification``;
    ``AutoModel`` when it names none. Its preprocessing comes from the folder's
    ``preprocessor_config.json`` (:func:`tokensparse.data.data_config`).
    """
    try:
        import transformers
    except ImportError:
        raise TokenSparseError('hf: models need transformers: pip install "tokensparse[hf]"') from None
    if not source:
        raise TokenSparseError("give a folder or model hub id after 'hf:', e.g. hf:./vit-base or hf:google/vit-base")
    local = Path(source).expanduser()
    if not local.exists():  # a hub id: fail fast when it cannot be fetched (offline, or the hub does not answer)
        problem = "HF_HUB_OFFLINE is set" if _offline() else hub_unreachable(hub_constants.ENDPOINT)
        if problem is not None:
            raise TokenSparseError(f"hf:{source}: no such folder, and as a model hub id it cannot be fetched "
                                   f"({problem}); give a folder written by save_pretrained")
    path = str(local) if local.exists() else source
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        names = getattr(config, "architectures", None) or []
        cls = getattr(transformers, names[0], None) if names else transformers.AutoModel
        if cls is None:
            raise TokenSparseError(f"hf:{source}: config.json names the class {names[0]!r}, which this "
                                   f"transformers {transformers.__version__} does not have")
        try:
            model = cls.from_pretrained(path, attn_implementation="sdpa")
        except ValueError as exc:  # a class without SDPA attention: patching it names the supported classes
            if not any(key in str(exc).lower() for key in ("sdpa", "scaled_dot_product_attention")):
                raise
            model = cls.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise TokenSparseError(f"cannot load the transformers model hf:{source}: {first_line(exc)}") from None
    return model.eval()


def create_model(name: str, weights: str | Path | None = None, pretrained: bool = False,
                 **kwargs: Any) -> nn.Module:
    """Create the timm model ``name`` in eval mode (or, for ``hf:PATH_OR_ID``, :func:`load_hf_model`).

    ``weights``: a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file loaded with
    ``strict=True``. ``pretrained``: timm's own download (needs a reachable model hub, or the
    weights in the local cache; when neither holds it fails within seconds, see
    :func:`check_pretrained_reachable`); giving both is an error. The model keeps timm's pretrained config for
    ``name``, so ``timm.data.resolve_data_config({}, model=model)`` gives its preprocessing.
    """
    if name.startswith(HF_PREFIX):
        if weights is not None or pretrained or kwargs:
            raise TokenSparseError(f"{name}: a transformers model loads its own weights from its folder; "
                                   f"--weights / --pretrained / model options apply to timm models only")
        return load_hf_model(name[len(HF_PREFIX):])
    _check_name(name)
    if weights is not None and pretrained:
        raise TokenSparseError("give either a weights file or pretrained=True, not both")
    if pretrained:
        check_pretrained_reachable(name, kwargs)
    try:
        model = timm.create_model(name, pretrained=pretrained and weights is None, **kwargs)
    except TypeError as exc:
        raise TokenSparseError(f"bad option for model {name!r}: {exc}") from None
    except (OSError, RuntimeError, ValueError) as exc:
        if not pretrained:
            raise
        raise TokenSparseError(
            f"could not get pretrained weights for {name!r} ({first_line(exc)}); "
            f"pass a local weights file instead") from None
    if weights is not None:
        load_weights(model, weights, name)
    return model.eval()


def _offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (now, or when huggingface_hub was imported)."""
    return bool(hub_constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def pretrained_download_url(name: str, kwargs: Mapping[str, Any] | None = None) -> str | None:
    """Where timm would download ``name``'s pretrained weights from, or None when nothing needs
    downloading (a local file or state dict in the pretrained config, weights already in the
    Hugging Face or torch hub cache, or no pretrained source at all)."""
    kwargs = kwargs or {}
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if overlay.get("file") or overlay.get("state_dict") is not None or kwargs.get("pretrained_cfg") is not None:
        return None
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or cfg.file or cfg.state_dict is not None:
        return None
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES
        if any(isinstance(try_to_load_from_cache(repo, f, cache_dir=hub_constants.HF_HUB_CACHE,
                                                 revision=revision or None), str) for f in files):
            return None
        return f"{hub_constants.ENDPOINT.rstrip('/')}/{repo}"
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        return None if cached.is_file() else cfg.url
    return None


def hub_unreachable(url: str, timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """Why ``url``'s host cannot be reached, or None if it can.

    One TCP connection attempt of at most ``timeout`` seconds, to the host or to the proxy the
    environment names for it (``HTTPS_PROXY`` ...), instead of the download's minute of retries.
    """
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or "", p.port or 80
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"


def check_pretrained_reachable(name: str, kwargs: Mapping[str, Any] | None = None) -> None:
    """TokenSparseError within seconds when ``name``'s pretrained weights are neither cached
    nor downloadable: ``HF_HUB_OFFLINE`` is set, or the hub does not answer a quick probe
    (:func:`hub_unreachable`)."""
    url = pretrained_download_url(name, kwargs)
    if url is None:
        return
    hint = "pass a local weights file instead (--weights FILE, or create_model(name, weights=FILE))"
    if _offline() and url.startswith(hub_constants.ENDPOINT.rstrip("/")):
        raise TokenSparseError(f"pretrained weights for {name!r} are not in the local Hugging Face cache and "
                               f"HF_HUB_OFFLINE is set; {hint}")
    reason = hub_unreachable(url)
    if reason is not None:
        raise TokenSparseError(f"cannot download pretrained weights for {name!r}: {url} is unreachable "
                               f"({reason}); {hint}")

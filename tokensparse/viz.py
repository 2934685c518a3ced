"""Token maps: what each reduction location kept, dropped, merged or highlighted.

:func:`token_map` is a pure function (image array + :class:`~tokensparse.LocationInfo` ->
RGB array) so the drawing can be tested pixel by pixel; :func:`token_maps` runs a model
with several methods on one image and draws one row per method, one column per location.

Drawing rules (generic over methods, from ``LocationInfo`` alone):

* dropped patches (``patch_to_token < 0``): greyed out (desaturated and lightened, R = G = B);
* merged patches (their token holds more than one patch: ToMe, PPT pooling, EViT's fused
  token): tinted with one colour per token and outlined along the group border;
* a method-specific ``(B, N0)`` bool mask in ``extra`` (Evo-ViT's ``informative``,
  DynamicViT's ``slow`` positions on ConvNeXt / Swin, ...): True patches shown as they are,
  False patches dimmed (darkened, colours kept);
* ``(B,)`` bool records (PPT's ``pooled``) are named in the panel title.
"""
from __future__ import annotations

import colorsys
import copy
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from torch import nn

from .api import location_records, patch
from .data import data_config, load_rgb, model_transform
from .errors import TokenSparseError
from .families import TokenFamily, get_family
from .models import create_model
from .spec import format_spec, parse_spec
from .state import LocationInfo
from .utils import atomic_write

GREY_BASE = 0.55
GREY_SCALE = 0.35
DIM_FACTOR = 0.3
TINT_ALPHA = 0.45
GOLDEN = 0.618033988749895
DPI = 90
LEGEND = ("grey: dropped patches | tinted + outlined: patches merged into one token (one colour "
          "per token) | darkened: Evo-ViT placeholders, ConvNeXt / Swin fast-path positions")


# ----------------------------------------------------------------------------- image input

def load_image(path: str | Path, model: nn.Module) -> torch.Tensor:
    """``(1, 3, H, W)`` image preprocessed with ``model``'s timm eval transform."""
    path = Path(path)
    if not path.is_file():
        raise TokenSparseError(f"image file not found: {str(path)!r}")
    return model_transform(model)(load_rgb(path)).unsqueeze(0)


def denormalise(x: torch.Tensor, config: dict[str, Any]) -> np.ndarray:
    """``(H, W, 3)`` float array in [0, 1] from a normalised ``(3, H, W)`` or ``(1, 3, H, W)`` tensor."""
    x = x.detach().float().cpu().reshape(3, x.shape[-2], x.shape[-1])
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- pure drawing

def group_colour(token: int) -> np.ndarray:
    """A distinct, saturated RGB colour for token index ``token`` (golden-ratio hues)."""
    hue = (token * GOLDEN) % 1.0
    return np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95))


def mask_key(loc: LocationInfo) -> str | None:
    """Name of the first ``(B, N0)`` bool record in ``loc.extra`` (e.g. ``informative``), or None."""
    shape = tuple(loc.patch_to_token.shape)
    for key, value in loc.extra.items():
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool and tuple(value.shape) == shape:
            return key
    return None


def _patch_view(img: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(gh, gw, ph, pw, 3)`` view of an ``(H, W, 3)`` image split into patches."""
    gh, gw = grid
    H, W, _ = img.shape
    if H % gh or W % gw:
        raise TokenSparseError(f"image {H}x{W} does not split into a {gh}x{gw} patch grid")
    ph, pw = H // gh, W // gw
    return img.reshape(gh, ph, gw, pw, 3).transpose(0, 2, 1, 3, 4)


def _outline(patches: np.ndarray, tokens: np.ndarray, merged: np.ndarray,
             colours: np.ndarray) -> None:
    """Draw a 1-pixel border (in place) on merged patches along edges to other tokens."""
    padded = np.pad(tokens, 1, constant_values=-2)
    for i, j in zip(*np.nonzero(merged)):
        edge = colours[i, j] * 0.5
        t = tokens[i, j]
        if padded[i, j + 1] != t:        # up
            patches[i, j, 0, :] = edge
        if padded[i + 2, j + 1] != t:    # down
            patches[i, j, -1, :] = edge
        if padded[i + 1, j] != t:        # left
            patches[i, j, :, 0] = edge
        if padded[i + 1, j + 2] != t:    # right
            patches[i, j, :, -1] = edge


def token_map(image: np.ndarray, loc: LocationInfo, grid: tuple[int, int], index: int = 0,
              mask: str | None = None) -> np.ndarray:
    """The ``(H, W, 3)`` map of one location for image ``index`` of the batch.

    Args:
        image: ``(H, W, 3)`` float RGB in [0, 1] (the de-normalised model input).
        loc: the location's record.
        grid: patch grid ``(gh, gw)`` with ``gh * gw == N0``.
        index: which image of the recorded batch.
        mask: ``extra`` key of a ``(B, N0)`` bool mask to highlight (default: :func:`mask_key`).
    """
    p2t = loc.patch_to_token[index].cpu().numpy().reshape(grid)
    size = loc.size[index].cpu().numpy()
    key = mask if mask is not None else mask_key(loc)
    out = np.array(image, dtype=np.float64, copy=True)
    patches = _patch_view(out, grid)  # a view: writes go to ``out``
    dropped = p2t < 0
    merged = ~dropped & (size[np.where(dropped, 0, p2t)] > 1)
    colours = np.zeros(grid + (3,))
    if key is not None:
        keep = loc.extra[key][index].cpu().numpy().reshape(grid)
        patches[~keep & ~dropped] *= DIM_FACTOR
    for i, j in zip(*np.nonzero(merged)):
        colours[i, j] = group_colour(int(p2t[i, j]))
        patches[i, j] = (1 - TINT_ALPHA) * patches[i, j] + TINT_ALPHA * colours[i, j]
    _outline(patches, p2t, merged, colours)
    grey = patches[dropped].mean(axis=-1, keepdims=True)
    patches[dropped] = GREY_BASE + GREY_SCALE * np.repeat(grey, 3, axis=-1)
    return out.astype(np.float32)


def location_title(loc: LocationInfo, index: int = 0) -> str:
    """Short panel title: block, remaining tokens, then kept patches and per-image records."""
    notes = []
    kept, n0 = int(loc.kept[index].sum()), loc.patch_to_token.shape[1]
    if kept < n0:
        notes.append(f"{kept}/{n0} kept")
    for key, value in loc.extra.items():
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.dim() == 1:
            notes.append(key if bool(value[index]) else f"not {key}")
    key = mask_key(loc)
    if key is not None:
        notes.append(f"{int(loc.extra[key][index].sum())} {key}")
    where = f"block {loc.block}" if loc.stage is None else f"stage {loc.stage + 1} block {loc.block}"
    title = f"{where}: {loc.num_tokens - loc.num_prefix} tok"
    return title + ("\n" + ", ".join(notes) if notes else "")


# ----------------------------------------------------------------------------- running models

def _resolve_model(model: str | nn.Module, weights: str | Path | None) -> nn.Module:
    """A model from a name (with optional weights) or the module itself (eval mode)."""
    if isinstance(model, nn.Module):
        if weights is not None:
            raise TokenSparseError("weights can only be given with a model name")
        return model.eval()
    return create_model(model, weights=weights)


def model_name(model: nn.Module) -> str:
    """timm's ``architecture.tag`` of ``model`` (its class name if unknown)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") or type(model).__name__
    return f"{arch}.{cfg['tag']}" if cfg.get("tag") else arch


def method_maps(model: nn.Module, spec: str, x: torch.Tensor,
                image: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """``[(title, map)]`` per location of ``spec`` on input ``x`` (``model`` is not modified)."""
    patched = patch(copy.deepcopy(model), spec).eval()
    with torch.inference_mode():
        patched(x)
    return [(location_title(loc), token_map(image, loc, location_grid(loc, model)))
            for loc in location_records(patched)]


def location_grid(loc: LocationInfo, model: nn.Module) -> tuple[int, int]:
    """The ``(H, W)`` grid of a location's positions: its own (ConvNeXt / Swin stages) or the model's patches."""
    if loc.grid is not None:
        return loc.grid
    family = get_family(model)
    if not isinstance(family, TokenFamily):
        raise TokenSparseError(f"cannot tell the position grid of {type(model).__name__} at block {loc.block}")
    return family.patch_grid()


def compute_maps(model: str | nn.Module, methods: Sequence[str], image: str | Path,
                 weights: str | Path | None = None
                 ) -> tuple[np.ndarray, dict[str, list[tuple[str, np.ndarray]]]]:
    """The de-normalised input and ``{spec: [(title, map), ...]}`` for each method."""
    if not methods:
        raise TokenSparseError("give at least one method")
    model = _resolve_model(model, weights)
    x = load_image(image, model)
    picture = denormalise(x, data_config(model))
    return picture, {spec: method_maps(model, spec, x, picture) for spec in methods}


def display_spec(spec: str, width: int = 28) -> str:
    """``spec`` for a panel title: the name, then its options wrapped to ``width`` characters,
    file paths shortened to their names (``predictors=/a/b/p.safetensors`` -> ``p.safetensors``)."""
    name, options = parse_spec(spec)
    short = {k: Path(v).name if isinstance(v, str) and ("/" in v or "\\" in v) else v for k, v in options.items()}
    text = format_spec(name, short)
    if len(text) <= width:
        return text
    options_text = ", ".join(format_spec(name, {k: v})[len(name) + 1:] for k, v in short.items())
    return name + "\n" + textwrap.fill(options_text, width)


def draw_maps(picture: np.ndarray, maps: dict[str, list[tuple[str, np.ndarray]]],
              title: str = "") -> Any:
    """A matplotlib Figure: one row per method, the input then one panel per location.

    A plain :class:`matplotlib.figure.Figure` (no pyplot, the global backend is left alone).
    """
    cols = 1 + max((len(m) for m in maps.values()), default=0)
    rows = len(maps)
    fig = Figure(figsize=(1.9 * cols, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, (spec, panels) in enumerate(maps.items()):
        axes[r, 0].imshow(picture)
        axes[r, 0].set_title("input", fontsize=7)
        axes[r, 0].set_ylabel(display_spec(spec), fontsize=8, fontweight="bold")
        for c, (label, arr) in enumerate(panels, start=1):
            axes[r, c].imshow(arr)
            axes[r, c].set_title(label, fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes[r, len(panels) + 1:]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.text(0.5, 0.005, LEGEND, ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def figure_formats() -> list[str]:
    """File suffixes (without the dot) a figure can be saved as: matplotlib's formats, except
    ``pgf`` (it needs a LaTeX installation)."""
    return sorted(f for f in FigureCanvasBase.get_supported_filetypes() if f != "pgf")


def figure_path(out: str | Path) -> Path:
    """The file :func:`save_figure` writes for ``out``: ``out`` itself, or ``out.png`` when it has
    no suffix (as matplotlib). TokenSparseError naming the suffix and the allowed ones when
    matplotlib cannot write that format (``maps.txt``)."""
    path = Path(out)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    formats = figure_formats()
    if path.suffix[1:].lower() not in formats:
        raise TokenSparseError(f"cannot save a figure as {str(out)!r}: {path.suffix!r} is not an image format "
                               f"matplotlib writes; use one of {', '.join('.' + f for f in formats)}")
    return path


def save_figure(fig: Any, out: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` atomically to :func:`figure_path` ``(out)``, in the format its suffix names
    (PNG without one); returns the path written. TokenSparseError for a format matplotlib does
    not write or a file that cannot be written."""
    path = figure_path(out)
    fmt = path.suffix[1:].lower()
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))


def finish_figure(fig: Any, title: str | None, out: str | Path | None) -> Any:
    """Give ``fig`` its ``title`` (if any), lay it out and save it to ``out`` (if given, :func:`save_figure`);
    returns it."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if out is not None:
        save_figure(fig, out)
    return fig


def token_maps(model: str | nn.Module, methods: Sequence[str], image: str | Path,
               out: str | Path | None = None,
               weights: str | Path | None = None) -> Any:
    """Token maps of several methods on one image as a matplotlib Figure (saved to ``out``).

    Args:
        model: a timm model name (created with :func:`tokensparse.models.create_model`) or
            an unpatched model (it is copied, never modified).
        methods: method specs, e.g. ``["tome:r=13", "evit"]``.
        image: image file, preprocessed with the model's timm data config.
        out: image file to write (PNG, or another format :func:`figure_formats` names by
            its suffix; ``out.png`` when it has none), or None.
        weights: weights file for a model given by name.
    """
    if out is not None:
        figure_path(out)  # an unsupported format fails before any model runs
    name = model if isinstance(model, str) else model_name(model)
    picture, maps = compute_maps(model, methods, image, weights)
    fig = draw_maps(picture, maps, title=f"{name} | {Path(image).name}")
    if out is not None:
        save_figure(fig, out)
    return fig

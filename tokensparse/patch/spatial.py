"""Shared machinery for hierarchical models (ConvNeXt, Swin): routed stages.

In a routed stage, a predictor before some blocks decides, per image and position of the
feature map, whether the following blocks take their full ("slow") path or a cheap "fast"
path. Nothing is dropped: results are written back in place, so the feature map keeps its
shape and every later stage, ``features_only`` models and ``forward_intermediates`` work
unchanged. The family files (:mod:`~tokensparse.patch.convnext`, :mod:`~tokensparse.patch.swin`)
say how a block splits its computation and how its feature map is laid out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..errors import TokenSparseError
from ..ops import route_tokens
from ..state import LocationInfo, TokenState
from .base import swap_class


@dataclass
class Route:
    """Which positions of a ``(B, N, C)`` token map take the slow path.

    ``mask`` ``(B, N, 1)`` (training: 1 slow, 0 fast, straight-through gradients), or
    ``slow_idx`` ``(B, K)`` (ascending) and ``fast_idx`` ``(B, N - K)`` (evaluation).
    """
    mask: Optional[Tensor] = None
    slow_idx: Optional[Tensor] = None
    fast_idx: Optional[Tensor] = None

    def apply(self, x: Tensor, slow_fn: Callable[[Tensor], Tensor], fast_fn: Callable[[Tensor], Tensor]) -> Tensor:
        """:func:`~tokensparse.ops.route_tokens` of tokens ``x`` ``(B, N, C)`` along this route."""
        return route_tokens(x, slow_fn, fast_fn, self.mask, self.slow_idx, self.fast_idx)

    def slow_positions(self, n: int) -> Tensor:
        """``(B, N)`` bool: the positions on the slow path."""
        if self.mask is not None:
            return self.mask.detach().squeeze(-1) > 0.5
        out = torch.zeros(self.slow_idx.shape[0], n, dtype=torch.bool, device=self.slow_idx.device)
        return out.scatter_(1, self.slow_idx, True)


class SpatialState(TokenState):
    """Per-pass state of a routed stage: its records, training masks and the final features.

    ``masks``: per location ``(B, N)`` training masks (with gradients); ``features``:
    ``(B, N, C)`` tokens of the model's last ``forward_features`` output (full models only).
    """

    def __init__(self, stage: int) -> None:
        super().__init__(num_prefix=0)
        self.stage = stage
        self.masks: list[Tensor] = []
        self.features: Optional[Tensor] = None

    def __deepcopy__(self, memo: dict) -> "SpatialState":
        """A fresh state: the records of a pass (with autograd history) are not copied."""
        return SpatialState(self.stage)

    def begin(self, tokens: Tensor) -> None:
        """Start a pass of the routed stage on its input tokens ``(B, N, C)``."""
        self.start(tokens)
        self.masks, self.features = [], None

    def record_route(self, block: int, route: Route, grid: tuple[int, int]) -> None:
        """Store a :class:`LocationInfo` for a predictor before ``block``: ``extra["slow"]``."""
        B, n = self.patch_to_token.shape
        self.locations.append(LocationInfo(
            block=block, num_prefix=0, size=torch.ones(B, n, device=self.patch_to_token.device),
            patch_to_token=self.patch_to_token, extra={"slow": route.slow_positions(n)}, grid=grid,
            stage=self.stage))


class RoutedStage(nn.Module):
    """Mixin for a timm stage (``downsample`` then ``blocks``) whose blocks follow routes.

    A block with a ``ts_predictor`` computes a new :class:`Route` from its input tokens; every
    later block of the stage follows the latest route with its ``forward_routed``. Families
    implement :meth:`tokens` and :meth:`grid` for their feature-map layout.
    """
    _ts_state: SpatialState

    def tokens(self, x: Tensor) -> Tensor:
        """``(B, N, C)`` tokens of a feature map in this family's layout."""
        raise NotImplementedError

    def grid(self, x: Tensor) -> tuple[int, int]:
        """``(H, W)`` of a feature map in this family's layout."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if getattr(self, "grad_checkpointing", False):
            raise TokenSparseError("disable gradient checkpointing (model.set_grad_checkpointing(False)) "
                                   "before using a patched stage")
        return self.forward_blocks(self.downsample(x))

    def forward_blocks(self, x: Tensor, start: int = 0) -> Tensor:
        """Run ``blocks[start:]`` on the feature map ``x`` (predictors from ``start`` on)."""
        state = self._ts_state
        state.begin(self.tokens(x))
        route: Optional[Route] = None
        for i in range(start, len(self.blocks)):
            blk = self.blocks[i]
            predictor = blk._modules.get("ts_predictor")
            if predictor is not None:
                route = predictor(self.tokens(x), state)
                state.record_route(i, route, self.grid(x))
            x = blk(x) if route is None else blk.forward_routed(x, route)
        return x


def install(model: nn.Module, stage: nn.Module, index: int, stage_cls: type, block_cls: type,
            predictors: dict[int, nn.Module], fast_paths: dict[int, nn.Module],
            model_cls: Optional[type] = None) -> SpatialState:
    """Swap ``stage`` (stage ``index`` of the model) to ``stage_cls`` and its routed blocks to ``block_cls``.

    ``predictors[i]`` becomes ``stage.blocks[i].ts_predictor`` and ``fast_paths[i]``
    ``stage.blocks[i].ts_fast``; ``model_cls`` (optional) records the model's final features.
    """
    state = SpatialState(index)
    swap_class(stage, stage_cls)
    stage._ts_state = state
    for i, blk in enumerate(stage.blocks):
        if i in fast_paths:
            swap_class(blk, block_cls)
            blk.ts_fast = fast_paths[i]
        if i in predictors:
            blk.ts_predictor = predictors[i]
    if model_cls is not None:
        swap_class(model, model_cls)
    model._ts_state = state
    return state


def uninstall(model: nn.Module, stage: nn.Module) -> None:
    """Undo :func:`install` (the class swaps are undone by :func:`~tokensparse.patch.unpatch`)."""
    for blk in stage.blocks:
        for name in ("ts_predictor", "ts_fast"):
            if name in blk._modules:
                del blk._modules[name]
    stage.__dict__.pop("_ts_state", None)
    model.__dict__.pop("_ts_state", None)


# ----------------------------------------------------------------------------- shared by the families

ROUTED_STAGE = 2
"""Index of the routed stage: the third, which holds most of a hierarchical model's blocks."""


def routed_stage(model: nn.Module, stage_cls: type, family: str) -> nn.Module:
    """The third ``stage_cls`` stage of ``model`` (a full model or a ``features_only`` wrapper)."""
    found = [m for m in model.modules() if isinstance(m, stage_cls)]
    if len(found) <= ROUTED_STAGE:
        raise TokenSparseError(f"this {family} has {len(found)} stages; spatial sparsification routes the "
                               f"third, so it needs at least 3 (a features_only model must keep out_indices up to 2)")
    return found[ROUTED_STAGE]


def run_to(stem: nn.Module, stages: nn.Sequential, x: Tensor, start: int) -> Tensor:
    """The feature map entering block ``start`` of the routed stage: ``stem``, earlier stages, downsampling."""
    x = stem(x)
    for stage in stages[:ROUTED_STAGE]:
        x = stage(x)
    stage = stages[ROUTED_STAGE]
    x = stage.downsample(x)
    for blk in stage.blocks[:start]:
        x = blk(x)
    return x


def run_from(stages: nn.Sequential, h: Tensor, start: int) -> Tensor:
    """The last stage's output from the map ``h`` entering block ``start`` of the routed stage."""
    stage = stages[ROUTED_STAGE]
    if isinstance(stage, RoutedStage):
        h = stage.forward_blocks(h, start)
    else:
        for blk in stage.blocks[start:]:
            h = blk(h)
    for later in stages[ROUTED_STAGE + 1:]:
        h = later(h)
    return h

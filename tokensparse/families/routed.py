"""Routed stages: the machinery ConvNeXt and Swin share, as one parameterised family.

In a routed stage, a predictor before some blocks decides, per image and position of the
feature map, whether the following blocks take their full ("slow") path or a cheap "fast"
path. Nothing is dropped: results are written back in place, so the feature map keeps its
shape and every later stage, ``features_only`` models and ``forward_intermediates`` work
unchanged. A family file (:mod:`~tokensparse.families.convnext`,
:mod:`~tokensparse.families.swin`) subclasses :class:`RoutedFamily` with its stage class,
feature-map layout and a block mixin that says how its block splits its computation.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import timm.data
import torch
from timm.models._features import FeatureDictNet, FeatureGetterNet
from torch import Tensor, nn

from ..errors import TokenSparseError
from ..ops import route_tokens
from ..state import LocationInfo, TokenState
from .base import TimmParts, attach, ensure_slot, swap_class
from .vit import checkpointing_error

ROUTED_STAGE = 2
"""Index of the routed stage: the third, which holds most of a hierarchical model's blocks."""
PREDICTOR = "ts_predictor"
FAST = "ts_fast"


@dataclass
class Route:
    """Which positions of a ``(B, N, C)`` token map take the slow path.

    ``mask`` ``(B, N, 1)`` (training: 1 slow, 0 fast, straight-through gradients), or
    ``slow_idx`` ``(B, K)`` (ascending) and ``fast_idx`` ``(B, N - K)`` (evaluation).
    """
    mask: Tensor | None = None
    slow_idx: Tensor | None = None
    fast_idx: Tensor | None = None

    def apply(self, x: Tensor, slow_fn: Callable[[Tensor], Tensor], fast_fn: Callable[[Tensor], Tensor]) -> Tensor:
        """:func:`~tokensparse.ops.route_tokens` of tokens ``x`` ``(B, N, C)`` along this route."""
        return route_tokens(x, slow_fn, fast_fn, self.mask, self.slow_idx, self.fast_idx)

    def slow_positions(self, n: int) -> Tensor:
        """``(B, N)`` bool: the positions on the slow path."""
        if self.mask is not None:
            return self.mask.detach().squeeze(-1) > 0.5
        out = torch.zeros(self.slow_idx.shape[0], n, dtype=torch.bool, device=self.slow_idx.device)
        return out.scatter_(1, self.slow_idx, True)


def layout_tokens(x: Tensor, layout: str) -> Tensor:
    """``(B, H*W, C)`` tokens of a feature map laid out ``"nchw"`` or ``"nhwc"``."""
    if layout == "nchw":
        return x.flatten(2).transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def layout_grid(x: Tensor, layout: str) -> tuple[int, int]:
    """``(H, W)`` of a feature map laid out ``"nchw"`` or ``"nhwc"``."""
    return (int(x.shape[-2]), int(x.shape[-1])) if layout == "nchw" else (int(x.shape[1]), int(x.shape[2]))


def record_route(state: TokenState, block: int, route: Route, grid: tuple[int, int], stage: int) -> None:
    """Store a :class:`LocationInfo` for a predictor before ``block``: ``extra["slow"]``."""
    B, n = state.patch_to_token.shape
    state.locations.append(LocationInfo(
        block=block, num_prefix=0, size=torch.ones(B, n, device=state.patch_to_token.device),
        patch_to_token=state.patch_to_token, extra={"slow": route.slow_positions(n)}, grid=grid, stage=stage))


class RoutedStage(nn.Module):
    """Mixin for a timm stage (``downsample`` then ``blocks``) whose blocks follow routes.

    A block with a ``ts_predictor`` computes a new :class:`Route` from its input tokens; every
    later block of the stage follows the latest route with its ``forward_routed``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if getattr(self, "grad_checkpointing", False):
            raise checkpointing_error(self)
        return self.forward_blocks(self.downsample(x))

    def forward_blocks(self, x: Tensor, start: int = 0) -> Tensor:
        """Run ``blocks[start:]`` on the feature map ``x`` (predictors from ``start`` on)."""
        s = self.__dict__["_ts"]
        state: TokenState = s.state
        layout = s.config["layout"]
        state.start(layout_tokens(x, layout))
        route: Route | None = None
        for i in range(start, len(self.blocks)):
            blk = self.blocks[i]
            predictor = blk._modules.get(PREDICTOR)
            if predictor is not None:
                route = predictor(layout_tokens(x, layout), state)
                record_route(state, i, route, layout_grid(x, layout), s.index)
            x = blk(x) if route is None else blk.forward_routed(x, route)
        return x


class FeatureRecorder(nn.Module):
    """Mixin for a full model: keeps its final feature map as tokens for the training losses,
    and refuses gradient checkpointing while patched."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Refused while patched (:func:`~tokensparse.families.vit.checkpointing_error`); disabling is allowed."""
        if enable:
            raise checkpointing_error(self)
        super().set_grad_checkpointing(False)

    def forward_features(self, x: Tensor) -> Tensor:
        out = super().forward_features(x)
        s = self.__dict__["_ts"]
        if s.state.keep_features:
            s.state.features = layout_tokens(out, s.config["layout"])
        return out


class RoutedFamily(TimmParts):
    """A hierarchical model (timm ConvNeXt, Swin) whose third stage is routed.

    Subclasses set ``model_cls`` (the full model), ``stage_cls``, ``block_cls`` (the block
    mixin with ``forward_routed``), ``layout``, ``stem`` / ``stages`` / ``final_norm``
    attribute names of the full model, ``deep_stage`` / ``deep_locations`` (predictor
    locations for deep third stages; 1, 2, 3 otherwise) and implement :meth:`width` (and
    :meth:`check_block` for checks beyond the block class).
    """
    name: ClassVar[str]
    description: ClassVar[str]
    model_cls: ClassVar[type]
    stage_cls: ClassVar[type]
    block_cls: ClassVar[type]
    layout: ClassVar[str]
    stem: ClassVar[str]
    stages: ClassVar[str]
    final_norm: ClassVar[str]
    deep_stage: ClassVar[int]
    deep_locations: ClassVar[tuple[int, ...]]

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if isinstance(model, cls.model_cls):
            return True
        return isinstance(model, (FeatureDictNet, FeatureGetterNet)) and any(
            isinstance(m, cls.stage_cls) for m in model.modules())

    @property
    def stage(self) -> nn.Module:
        """The routed (third) stage, or a clear error if the model has fewer."""
        found = [m for m in self.model.modules() if isinstance(m, self.stage_cls)]
        if len(found) <= ROUTED_STAGE:
            raise TokenSparseError(
                f"this {self.description} has {len(found)} stages; spatial sparsification routes the "
                f"third, so it needs at least 3 (a features_only model must keep out_indices up to 2)")
        return found[ROUTED_STAGE]

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.stage.blocks

    @property
    def has_head(self) -> bool:
        """Whether the model is a full classifier (not a ``features_only`` wrapper)."""
        return isinstance(self.model, self.model_cls)

    def check_block(self, i: int, block: nn.Module, method: str) -> None:
        """Raise a clear error unless block ``i`` of the routed stage can be routed (is a ``block_cls`` base)."""
        supported = self.block_cls.__bases__[0]
        if not isinstance(block, supported):
            raise TokenSparseError(
                f"method '{method}': block {i} of the third stage is a {type(block).__name__}; supported: timm "
                f"{supported.__name__} ({self.description})")

    def width(self) -> int:
        """Channels of the routed stage's feature map."""
        raise NotImplementedError

    def check(self, method: str) -> None:
        stage = self.stage
        if getattr(stage, "grad_checkpointing", False):
            raise TokenSparseError("disable gradient checkpointing (model.set_grad_checkpointing(False)) before patching")
        for i, blk in enumerate(stage.blocks):
            self.check_block(i, blk, method)

    @classmethod
    def default_locations(cls, depth: int) -> list[int]:
        """Blocks 1, 2, 3 of the routed stage, or ``deep_locations`` for stages of ``deep_stage`` blocks or more."""
        return [b for b in (cls.deep_locations if depth >= cls.deep_stage else (1, 2, 3)) if b < depth]

    def install(self, state: TokenState, predictors: dict[int, nn.Module], fast_paths: dict[int, nn.Module]) -> None:
        """Route the third stage: ``predictors[i]`` before block ``i``, ``fast_paths[i]`` in block ``i``."""
        stage = self.stage
        swap_class(stage, RoutedStage, state, ROUTED_STAGE).config["layout"] = self.layout
        for i, blk in enumerate(stage.blocks):
            if i in fast_paths:
                swap_class(blk, self.block_cls, state, i)
                attach(blk, FAST, fast_paths[i])
            if i in predictors:
                attach(blk, PREDICTOR, predictors[i])
        model_slot = swap_class(self.model, FeatureRecorder, state) if self.has_head else None
        if model_slot is None:  # a features_only wrapper: only the slot (the pass state)
            model_slot = ensure_slot(self.model)
            model_slot.state = state
        model_slot.config["layout"] = self.layout

    def run_to(self, x: Tensor, start: int) -> Tensor:
        stages = getattr(self.model, self.stages)
        x = getattr(self.model, self.stem)(x)
        for stage in stages[:ROUTED_STAGE]:
            x = stage(x)
        stage = stages[ROUTED_STAGE]
        x = stage.downsample(x)
        for blk in stage.blocks[:start]:
            x = blk(x)
        return x

    def features_from(self, h: Tensor, start: int) -> Tensor:
        stages = getattr(self.model, self.stages)
        stage = stages[ROUTED_STAGE]
        if isinstance(stage, RoutedStage):
            h = stage.forward_blocks(h, start)
        else:
            for blk in stage.blocks[start:]:
                h = blk(h)
        for later in stages[ROUTED_STAGE + 1:]:
            h = later(h)
        out = getattr(self.model, self.final_norm)(h)
        s = self.model.__dict__.get("_ts")
        if s is not None and s.state is not None and s.state.keep_features:
            s.state.features = self.feature_tokens(out)
        return out

    def feature_tokens(self, features: Tensor) -> Tensor:
        return layout_tokens(features, self.layout)

    def num_positions(self) -> int:
        size = timm.data.resolve_data_config({}, model=self.model)["input_size"]
        info = self.model.feature_info
        reduction = (info.get_dicts() if hasattr(info, "get_dicts") else info)[ROUTED_STAGE]["reduction"]
        return (size[1] // reduction) * (size[2] // reduction)

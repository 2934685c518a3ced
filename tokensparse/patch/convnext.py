"""Patches for timm ``ConvNeXt`` (full models and ``features_only`` wrappers).

Dynamic spatial sparsification (DynamicViT's journal version, METHODS.md section 6) routes the
positions of the third stage: the depthwise convolution still sees the whole map; the
expensive per-position part (LayerNorm, MLP, layer scale) runs only on the slow positions,
a cheap fast path on the others, and the results are written back in place.
"""
from __future__ import annotations

from torch import Tensor, nn

from timm.layers import Mlp
from timm.models.convnext import ConvNeXt, ConvNeXtBlock, ConvNeXtStage

from ..errors import TokenSparseError
from . import spatial
from .spatial import Route, RoutedStage, SpatialState

def routed_stage(model: nn.Module) -> ConvNeXtStage:
    """The third stage, or a clear error if the model has fewer."""
    return spatial.routed_stage(model, ConvNeXtStage, "ConvNeXt")


def check_blocks(stage: nn.Module, method: str) -> None:
    """Raise a clear error unless every block of ``stage`` can be routed."""
    if getattr(stage, "grad_checkpointing", False):
        raise TokenSparseError("disable gradient checkpointing (model.set_grad_checkpointing(False)) before patching")
    for i, blk in enumerate(stage.blocks):
        if not isinstance(blk, ConvNeXtBlock) or type(blk.mlp) is not Mlp:
            raise TokenSparseError(
                f"method '{method}': block {i} of the third stage is a {type(blk).__name__} with a "
                f"{type(getattr(blk, 'mlp', None)).__name__}; supported: ConvNeXt (v1) blocks with a plain MLP "
                f"(ConvNeXt-V2's GlobalResponseNorm needs statistics over the whole map)")
        if not isinstance(blk.shortcut, nn.Identity):
            raise TokenSparseError(f"method '{method}': block {i} of the third stage changes resolution or width")


def width(stage: ConvNeXtStage) -> int:
    """Channels of the stage's feature map."""
    return int(stage.blocks[0].conv_dw.out_channels)


def default_locations(depth: int) -> list[int]:
    """Blocks 1, 2, 3 of the stage (ConvNeXt-T, 9 blocks), 3, 6, 9 for deep stages (27 blocks)."""
    return [b for b in ((3, 6, 9) if depth >= 27 else (1, 2, 3)) if b < depth]


def feature_tokens(features: Tensor) -> Tensor:
    """``(B, H*W, C)`` tokens of an NCHW feature map."""
    return features.flatten(2).transpose(1, 2)


class RoutedConvNeXtBlock(ConvNeXtBlock):
    """timm ``ConvNeXtBlock`` that can follow a :class:`~tokensparse.patch.spatial.Route`."""
    ts_fast: nn.Module

    def slow_path(self, t: Tensor) -> Tensor:
        """The block's per-position path (norm, MLP, layer scale) on tokens ``(B, n, C)``."""
        if self.use_conv_mlp:  # LayerNorm2d and 1x1 convolutions: lay the tokens out as a (n x 1) map
            y = self.mlp(self.norm(t.transpose(1, 2).unsqueeze(-1))).squeeze(-1).transpose(1, 2)
        else:
            y = self.mlp(self.norm(t))
        return y if self.gamma is None else y * self.gamma

    def forward_routed(self, x: Tensor, route: Route) -> Tensor:
        """The block with the depthwise convolution on the whole map and the rest routed."""
        shortcut = x
        x = self.conv_dw(x)
        B, C, H, W = x.shape
        y = route.apply(feature_tokens(x), self.slow_path, self.ts_fast)
        y = y.transpose(1, 2).reshape(B, C, H, W)
        return self.drop_path(y) + self.shortcut(shortcut)


class RoutedConvNeXtStage(RoutedStage, ConvNeXtStage):
    """timm ``ConvNeXtStage`` (NCHW maps) whose blocks follow routes."""

    def tokens(self, x: Tensor) -> Tensor:
        return feature_tokens(x)

    def grid(self, x: Tensor) -> tuple[int, int]:
        return int(x.shape[-2]), int(x.shape[-1])


class ConvNeXtWithFeatures(ConvNeXt):
    """timm ``ConvNeXt`` that keeps its final feature map as tokens for the training losses."""

    def forward_features(self, x: Tensor) -> Tensor:
        out = super().forward_features(x)
        self._ts_state.features = feature_tokens(out)
        return out


def install(model: nn.Module, predictors: dict[int, nn.Module], fast_paths: dict[int, nn.Module]) -> SpatialState:
    """Route the third stage: ``predictors[i]`` before block ``i``, ``fast_paths[i]`` in block ``i``."""
    model_cls = ConvNeXtWithFeatures if isinstance(model, ConvNeXt) else None  # full models record final features
    return spatial.install(model, routed_stage(model), spatial.ROUTED_STAGE, RoutedConvNeXtStage, RoutedConvNeXtBlock,
                           predictors, fast_paths, model_cls)


def uninstall(model: nn.Module) -> None:
    """Undo :func:`install` (class swaps are undone by :func:`tokensparse.unpatch`)."""
    spatial.uninstall(model, routed_stage(model))


def run_to(model: ConvNeXt, x: Tensor, start: int) -> Tensor:
    """The feature map entering block ``start`` of the routed stage, from images ``x``."""
    return spatial.run_to(model.stem, model.stages, x, start)


def features_from(model: ConvNeXt, h: Tensor, start: int) -> Tensor:
    """``forward_features`` from the map ``h`` entering block ``start`` of the routed stage."""
    return model.norm_pre(spatial.run_from(model.stages, h, start))

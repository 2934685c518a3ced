"""Patches for timm ``SwinTransformer`` (v1; full models and ``features_only`` wrappers).

Dynamic spatial sparsification (METHODS.md section 6) routes the positions of the third stage:
window attention still runs on every token; only the MLP is split between the slow positions
(the block's own MLP) and a cheap fast path, and the results are written back in place.
"""
from __future__ import annotations

from torch import Tensor, nn

from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, SwinTransformerStage

from ..errors import TokenSparseError
from . import spatial
from .spatial import Route, RoutedStage, SpatialState

def routed_stage(model: nn.Module) -> SwinTransformerStage:
    """The third stage, or a clear error if the model has fewer."""
    return spatial.routed_stage(model, SwinTransformerStage, "Swin Transformer")


def check_blocks(stage: nn.Module, method: str) -> None:
    """Raise a clear error unless every block of ``stage`` can be routed."""
    if getattr(stage, "grad_checkpointing", False):
        raise TokenSparseError("disable gradient checkpointing (model.set_grad_checkpointing(False)) before patching")
    for i, blk in enumerate(stage.blocks):
        if not isinstance(blk, SwinTransformerBlock):
            raise TokenSparseError(
                f"method '{method}': block {i} of the third stage is a {type(blk).__name__}; supported: timm "
                f"SwinTransformerBlock (Swin v1)")


def width(stage: SwinTransformerStage) -> int:
    """Channels of the stage's feature map."""
    return int(stage.blocks[0].norm1.normalized_shape[0])


def default_locations(depth: int) -> list[int]:
    """Blocks 1, 2, 3 of the stage (Swin-T, 6 blocks), 2, 4, 6 for deep stages (Swin-S/B, 18 blocks)."""
    return [b for b in ((2, 4, 6) if depth >= 18 else (1, 2, 3)) if b < depth]


def feature_tokens(features: Tensor) -> Tensor:
    """``(B, H*W, C)`` tokens of an NHWC feature map."""
    return features.reshape(features.shape[0], -1, features.shape[-1])


class RoutedSwinBlock(SwinTransformerBlock):
    """timm ``SwinTransformerBlock`` that can follow a :class:`~tokensparse.patch.spatial.Route`."""
    ts_fast: nn.Module

    def slow_path(self, t: Tensor) -> Tensor:
        """The block's MLP branch on tokens ``(B, n, C)``."""
        return self.mlp(self.norm2(t))

    def forward_routed(self, x: Tensor, route: Route) -> Tensor:
        """Window attention on every token, then the MLP routed (fast path elsewhere)."""
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        t = feature_tokens(x)
        t = t + self.drop_path2(route.apply(t, self.slow_path, self.ts_fast))
        return t.reshape(B, H, W, C)


class RoutedSwinStage(RoutedStage, SwinTransformerStage):
    """timm ``SwinTransformerStage`` (NHWC maps) whose blocks follow routes."""

    def tokens(self, x: Tensor) -> Tensor:
        return feature_tokens(x)

    def grid(self, x: Tensor) -> tuple[int, int]:
        return int(x.shape[1]), int(x.shape[2])


class SwinWithFeatures(SwinTransformer):
    """timm ``SwinTransformer`` that keeps its final feature map as tokens for the training losses."""

    def forward_features(self, x: Tensor) -> Tensor:
        out = super().forward_features(x)
        self._ts_state.features = feature_tokens(out)
        return out


def install(model: nn.Module, predictors: dict[int, nn.Module], fast_paths: dict[int, nn.Module]) -> SpatialState:
    """Route the third stage: ``predictors[i]`` before block ``i``, ``fast_paths[i]`` in block ``i``."""
    model_cls = SwinWithFeatures if isinstance(model, SwinTransformer) else None  # full models record final features
    return spatial.install(model, routed_stage(model), spatial.ROUTED_STAGE, RoutedSwinStage, RoutedSwinBlock,
                           predictors, fast_paths, model_cls)


def uninstall(model: nn.Module) -> None:
    """Undo :func:`install` (class swaps are undone by :func:`tokensparse.unpatch`)."""
    spatial.uninstall(model, routed_stage(model))


def run_to(model: SwinTransformer, x: Tensor, start: int) -> Tensor:
    """The feature map entering block ``start`` of the routed stage, from images ``x``."""
    return spatial.run_to(model.patch_embed, model.layers, x, start)


def features_from(model: SwinTransformer, h: Tensor, start: int) -> Tensor:
    """``forward_features`` from the map ``h`` entering block ``start`` of the routed stage."""
    return model.norm(spatial.run_from(model.layers, h, start))

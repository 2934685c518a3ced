"""timm ``SwinTransformer`` (v1; full models and ``features_only`` wrappers): a routed family.

Dynamic spatial sparsification (METHODS.md section 6) routes the positions of the third stage:
window attention still runs on every token; only the MLP is split between the slow positions
(the block's own MLP) and a cheap fast path, and the results are written back in place.
"""
from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, SwinTransformerStage
from torch import Tensor

from .routed import FAST, Route, RoutedFamily, layout_tokens


class RoutedSwinBlock(SwinTransformerBlock):
    """timm ``SwinTransformerBlock`` that can follow a :class:`~tokensparse.families.routed.Route`."""

    def slow_path(self, t: Tensor) -> Tensor:
        """The block's MLP branch on tokens ``(B, n, C)``."""
        return self.mlp(self.norm2(t))

    def forward_routed(self, x: Tensor, route: Route) -> Tensor:
        """Window attention on every token, then the MLP routed (fast path elsewhere)."""
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        t = layout_tokens(x, "nhwc")
        t = t + self.drop_path2(route.apply(t, self.slow_path, self._modules[FAST]))
        return t.reshape(B, H, W, C)


class SwinFamily(RoutedFamily):
    """timm Swin Transformer (v1): NHWC maps, third stage routed."""
    name, description = "swin", "timm SwinTransformer (v1), full or features_only"
    model_cls, stage_cls, block_cls = SwinTransformer, SwinTransformerStage, RoutedSwinBlock
    layout, stem, stages, final_norm = "nhwc", "patch_embed", "layers", "norm"
    deep_stage, deep_locations = 18, (2, 4, 6)

    def width(self) -> int:
        return int(self.stage.blocks[0].norm1.normalized_shape[0])

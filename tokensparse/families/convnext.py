"""timm ``ConvNeXt`` (v1; full models and ``features_only`` wrappers): a routed family.

Dynamic spatial sparsification (METHODS.md section 6) routes the positions of the third stage:
the depthwise convolution still sees the whole map; the expensive per-position part
(LayerNorm, MLP, layer scale) runs only on the slow positions, a cheap fast path on the
others, and the results are written back in place.
"""
from __future__ import annotations

from timm.layers import Mlp
from timm.models.convnext import ConvNeXt, ConvNeXtBlock, ConvNeXtStage
from torch import Tensor, nn

from ..errors import TokenSparseError
from .routed import FAST, Route, RoutedFamily, layout_tokens


class RoutedConvNeXtBlock(ConvNeXtBlock):
    """timm ``ConvNeXtBlock`` that can follow a :class:`~tokensparse.families.routed.Route`."""

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
        y = route.apply(layout_tokens(x, "nchw"), self.slow_path, self._modules[FAST])
        y = y.transpose(1, 2).reshape(B, C, H, W)
        return self.drop_path(y) + self.shortcut(shortcut)


class ConvNeXtFamily(RoutedFamily):
    """timm ConvNeXt (v1): NCHW maps, third stage routed."""
    name, description = "convnext", "timm ConvNeXt (v1), full or features_only"
    model_cls, stage_cls, block_cls = ConvNeXt, ConvNeXtStage, RoutedConvNeXtBlock
    layout, stem, stages, final_norm = "nchw", "stem", "stages", "norm_pre"
    deep_stage, deep_locations = 27, (3, 6, 9)

    def check_block(self, i: int, block: nn.Module, method: str) -> None:
        """A ConvNeXt (v1) block with a plain MLP that keeps resolution and width."""
        if not isinstance(block, ConvNeXtBlock) or type(block.mlp) is not Mlp:
            raise TokenSparseError(
                f"method '{method}': block {i} of the third stage is a {type(block).__name__} with a "
                f"{type(getattr(block, 'mlp', None)).__name__}; supported: ConvNeXt (v1) blocks with a plain MLP "
                f"(ConvNeXt-V2's GlobalResponseNorm needs statistics over the whole map)")
        if not isinstance(block.shortcut, nn.Identity):
            raise TokenSparseError(f"method '{method}': block {i} of the third stage changes resolution or width")

    def width(self) -> int:
        return int(self.stage.blocks[0].conv_dw.out_channels)

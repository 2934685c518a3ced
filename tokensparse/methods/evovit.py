"""Evo-ViT: slow-fast token evolution guided by global class attention (METHODS.md §4).

What is computed, per forward pass:

- *Global class attention* ``g`` ``(B, n)`` over the ``n`` patch tokens, kept in their original
  positions: ``g_0 = A_cls(block 0)`` summed over heads, then
  ``g_l = (1 - alpha) g_{l-1} + alpha A_cls(block l)``. Inside an evolution block ``A_cls`` is
  the class row over the tokens that block sees (prefix + informative + representative); only
  the informative tokens' ``g`` is updated, placeholders keep their last ``g``.
- *Evolution stages*: from ``stages[0]`` on, patch tokens are split by ``g`` into the top
  ``keep_rate`` *informative* tokens and the rest, the *placeholders*. Informative tokens
  (with the prefix tokens) take the full block (slow path). With ``update="representative"``
  (paper, default) the placeholders are summarised into one representative token (their
  ``g``-weighted average, weights normalised) that goes through the block with them, and its
  change (output minus input) is added to every placeholder (fast path). With
  ``update="carry"`` (authors' DeiT code) placeholders skip the stage unchanged.
- Placeholders are restored in place (original positions) at the end of each stage, so the
  final token map is complete with its spatial layout: dense heads and pooling work as usual.

Options (``tokensparse.patch(model, "evovit:...")``):

- ``stages``: block indices where evolution stages start; a stage lasts until the next start
  or the end of the model. Default: 1/4, 1/2 and 3/4 of the depth (``[3, 6, 9]`` for 12
  blocks), the locations every other method here defaults to. The authors' DeiT code uses
  ``[4, 8]``: on DeiT-S that is 3.05 GMACs (1.51x fewer than unreduced) and measured 1.54x
  faster (CPU, batch 32, 2 threads), at its overhead-free limit; starting one block earlier
  (2.86 GMACs) measured 1.64x in the same run, at a training-free cost on ViT-Tiny
  (keep 0.7: 78.6 vs 82.2 top-1 with ``[4, 8]``; benchmarks/evovit_accuracy.py). Pass
  ``stages=[4,8]`` for the authors' setting. The paper's layer-wise evolution also starts at
  one block and re-sorts in every block after it.
  Block 0 cannot start a stage (it computes the first ``g``).
- ``split``: ``"stage"`` (default) splits once at each stage start and keeps that split (and
  the placeholders' ``g``) for the whole stage, as the authors' DeiT code (their released
  inference code) and the stage-wise phase of the paper's layer-to-stage schedule do;
  ``"block"`` re-sorts tokens by ``g`` at every block from ``stages[0]`` on (the paper's
  layer-wise token evolution), i.e. every block is its own stage, so only ``stages[0]``
  matters. With a fixed split the representative token's block output *is* the
  representative of the updated placeholders (the weights sum to one and every placeholder
  moves by the same change), so ``"stage"`` carries it from block to block and adds the
  accumulated change once at the stage end: the paper's per-block fast path, computed with
  one gather and one scatter per stage instead of per block (``"block"``: 1.60x vs 1.64x on
  DeiT-S) and no measurable accuracy difference training-free. Hence the default.
- ``keep_rate`` (0.5, the authors'; or one per stage), ``alpha`` (0.5, paper; the authors'
  DeiT code uses 1 before the first stage), ``update`` (see above), ``pool``: ``"model"``
  (default) uses the model's own head (class token for pretrained ViT/DeiT), ``"mean"``
  averages the patch tokens after the final norm, as the authors' from-scratch classifier.

No train/eval branching: training and evaluation compute the same function (dropout and
drop-path aside), and gradients reach every parameter through both paths (``g`` stays in
the graph through the representative token's weights, as in the authors' code).

LeViT (timm ``levit_*`` and ``levit_conv_*``; :class:`EvoLevitStage`): evolution runs inside
each stage (from block 2 of the first stage and block 0 of the others, keep 0.5: the paper's
LeViT setting, option ``starts``), with LeViT's attention biases gathered for the informative
tokens; every stage's downsampling sees the complete, restored map and subsamples the global
attention. LeViT has no class token: ``class_token="add"`` (default, the paper's way) adds a
learned one that every attention and downsampling carries, for training from scratch;
``class_token="mean"`` adds nothing and takes class attention from the mean query, which keeps
pretrained weights usable without training. ``pool`` picks the classifier input: ``model``
/ ``mean`` (LeViT's own mean of tokens), ``token`` (the class token) or ``both`` (logits
averaged), always through the model's own head(s).

Per-location records (``tokensparse.info(model)``): one :class:`LocationInfo` per evolution
block. No token is ever dropped, so ``size`` is all ones ``(B, P + N0)`` and
``patch_to_token`` is the identity position map (restored layout). ``extra["informative"]``:
``(B, N0)`` bool, the patches that took the slow path in that block;
``extra["global_attention"]``: ``(B, N0)`` ``g`` after the block.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from timm.models.levit import Levit, LevitDownsample, LevitStage
from timm.models.vision_transformer import Block, VisionTransformer

from ..errors import TokenSparseError
from ..ops import gather_tokens, split_topk
from ..patch.base import swap_class
from ..patch.vit import ReducedVisionTransformer, check_vit, install
from ..state import LocationInfo, TokenState
from .base import Method, OptionInfo, check_choice, check_keep_rate, default_locations, keep_count

UPDATES = ("representative", "carry")
SPLITS = ("stage", "block")
POOLS = ("model", "mean", "token", "both")
CLASS_TOKENS = ("add", "mean")
_CLS_ATTN = frozenset({"cls_attn"})


# ----------------------------------------------------------------------------- pure tensor functions

def update_global_attention(g: Optional[Tensor], a: Tensor, alpha: float) -> Tensor:
    """``g_l = (1 - alpha) g_{l-1} + alpha a`` (``a`` alone when ``g`` is None: block 0).

    ``a``: ``(B, K)`` class attention summed over heads, for the tokens ``g`` describes.
    """
    if g is None:
        return a
    return (1 - alpha) * g + alpha * a


def representative_token(x_ph: Tensor, g_ph: Tensor) -> Tensor:
    """One token ``(B, 1, C)``: the ``g``-weighted average of placeholders ``(B, M, C)``.

    Weights are ``g_ph`` ``(B, M)`` normalised to sum to one per image.
    """
    w = g_ph / g_ph.sum(dim=1, keepdim=True).clamp_min(torch.finfo(g_ph.dtype).tiny)
    return (w.unsqueeze(1) @ x_ph)


def split_informative(g: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(informative, placeholders)`` patch indices: the ``k`` highest ``g`` (ascending) and the rest."""
    return split_topk(g, k)


def restore_placeholders(x_patch: Tensor, inf_idx: Tensor, y_inf: Tensor, delta: Optional[Tensor]) -> Tensor:
    """Complete patch map: ``x_patch`` ``(B, n, C)`` moved by ``delta`` ``(B, 1, C)`` (if any),
    with the informative tokens' new values ``y_inf`` ``(B, k, C)`` written at ``inf_idx``."""
    base = x_patch if delta is None else x_patch + delta
    return base.scatter(1, inf_idx.unsqueeze(-1).expand(-1, -1, base.shape[-1]), y_inf)


def default_stages(depth: int) -> list[int]:
    """Stage starts at 1/4, 1/2 and 3/4 of the depth (``[3, 6, 9]`` for 12 blocks).

    The blocks every location-based method of this package defaults to; block 0 is left out.
    """
    return [b for b in default_locations(depth) if b >= 1]


# ----------------------------------------------------------------------------- per-pass state

@dataclass
class _Split:
    """One stage's split: the full patch map at its start and what went where."""
    x_patch: Tensor              # (B, n, C) patch tokens at the stage start, original positions
    inf_idx: Tensor              # (B, k) informative patch indices (ascending)
    informative: Tensor          # (B, n) bool mask of inf_idx
    rep: Optional[Tensor]        # (B, 1, C) representative token at the stage start, or None


class EvoState(TokenState):
    """:class:`TokenState` plus the global class attention and the open stage's split."""

    def __init__(self, num_prefix: int) -> None:
        super().__init__(num_prefix=num_prefix, prop_attn=False)
        self.g: Optional[Tensor] = None
        self.split: Optional[_Split] = None

    def start(self, x: Tensor) -> None:
        super().start(x)
        self.g = None
        self.split = None

    def finish(self) -> None:
        super().finish()
        self.g = None          # drop references to this pass's tensors (and graph)
        self.split = None

    def record_evolution(self, block: int, batch: int, n: int, device: torch.device) -> None:
        """Store this block's :class:`LocationInfo` (identity layout, sizes one)."""
        P = self.num_prefix
        self.locations.append(LocationInfo(
            block=block, num_prefix=P, size=torch.ones(batch, P + n, device=device),
            patch_to_token=self.patch_to_token.detach(),
            extra={"informative": self.split.informative.detach(),
                   "global_attention": self.g.detach()}))


@dataclass(frozen=True)
class EvoPlan:
    """What one block does: plain (just updates ``g``) or part of an evolution stage."""
    evolve: bool = False
    stage_start: bool = False
    stage_end: bool = False
    keep_rate: float = 1.0
    update: str = "representative"


def open_stage(x: Tensor, g: Tensor, num_prefix: int, keep_rate: float, update: str) -> tuple[Tensor, _Split]:
    """Split the full map ``x`` ``(B, P + n, C)`` by global attention ``g`` ``(B, n)``.

    Returns the sequence ``[prefix, informative, (representative)]`` and the :class:`_Split`
    that :func:`close_stage` needs.
    """
    P = num_prefix
    x_patch = x[:, P:]
    n = x_patch.shape[1]
    k = keep_count(keep_rate, n)
    inf_idx, ph_idx = split_informative(g, k)
    informative = torch.zeros_like(g, dtype=torch.bool).scatter_(1, inf_idx, True)
    parts = [x[:, :P], gather_tokens(x_patch, inf_idx)]
    rep = None
    if update == "representative" and k < n:
        rep = representative_token(gather_tokens(x_patch, ph_idx), g.gather(1, ph_idx))
        parts.append(rep)
    return torch.cat(parts, dim=1), _Split(x_patch=x_patch, inf_idx=inf_idx, informative=informative, rep=rep)


def close_stage(x: Tensor, split: _Split, num_prefix: int) -> Tensor:
    """The full map after a stage: placeholders restored in place, moved by the representative's change."""
    P, k = num_prefix, split.inf_idx.shape[1]
    delta = None if split.rep is None else x[:, -1:] - split.rep
    return torch.cat([x[:, :P], restore_placeholders(split.x_patch, split.inf_idx, x[:, P:P + k], delta)], dim=1)


# ----------------------------------------------------------------------------- class swaps

class EvoViTBlock(Block):
    """timm ``Block`` that tracks global class attention and runs slow-fast token evolution.

    Between blocks of a stage the sequence is ``[prefix, informative, (representative)]``; the
    stage's first block splits the full map, its last block restores it.
    """
    _ts_state: EvoState
    _ts_index: int
    _ts_plan: EvoPlan
    _ts_alpha: float

    def forward_attn(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The block on ``x`` and the class attention row summed over heads ``(B, N)``."""
        y, extras = self.attn.forward_extras(self.norm1(x), None, _CLS_ATTN)
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, extras.cls_attn.sum(dim=1)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise TokenSparseError("evovit does not support attention masks or causal attention")
        state, plan = self._ts_state, self._ts_plan
        state.ensure_started(x)
        P = state.num_prefix
        if not plan.evolve:
            x, a = self.forward_attn(x)
            state.g = update_global_attention(state.g, a[:, P:], self._ts_alpha)
            return x
        if plan.stage_start:
            x = self.split_tokens(x, plan)
        split = state.split
        k = split.inf_idx.shape[1]
        x, a = self.forward_attn(x)
        g_inf = update_global_attention(state.g.gather(1, split.inf_idx), a[:, P:P + k], self._ts_alpha)
        state.g = state.g.scatter(1, split.inf_idx, g_inf)
        state.record_evolution(self._ts_index, x.shape[0], state.g.shape[1], x.device)
        if plan.stage_end:
            x = self.restore_tokens(x)
        return x

    def split_tokens(self, x: Tensor, plan: EvoPlan) -> Tensor:
        """Open a stage on the full map ``x``: ``[prefix, informative, (representative)]``."""
        state = self._ts_state
        x, state.split = open_stage(x, state.g, state.num_prefix, plan.keep_rate, plan.update)
        return x

    def restore_tokens(self, x: Tensor) -> Tensor:
        """Close the stage: the full map with placeholders in place (moved by the fast path)."""
        state = self._ts_state
        x, state.split = close_stage(x, state.split, state.num_prefix), None
        return x


class EvoViTVisionTransformer(ReducedVisionTransformer):
    """Adds ``pool="mean"``: the mean of the patch tokens (the authors' from-scratch classifier)."""
    _ts_pool: str

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        if getattr(self, "_ts_pool", "model") == "mean":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return super().pool(x, pool_type)


# ----------------------------------------------------------------------------- the method

def stage_plans(depth: int, stages: list[int], keep_rates: list[float], split: str,
                update: str) -> dict[int, EvoPlan]:
    """Per-block :class:`EvoPlan` of the evolution blocks (blocks before ``stages[0]`` are plain).

    With ``split="block"`` every block from ``stages[0]`` on is a one-block stage, with the
    keep rate of the stage it falls in.
    """
    if split == "block":
        keep_rates = [keep_rates[bisect_right(stages, b) - 1] for b in range(stages[0], depth)]
        stages = list(range(stages[0], depth))
    plans = {}
    bounds = list(stages) + [depth]
    for start, end, rate in zip(bounds[:-1], bounds[1:], keep_rates):
        for b in range(start, end):
            plans[b] = EvoPlan(evolve=True, stage_start=b == start, stage_end=b == end - 1,
                               keep_rate=rate, update=update)
    return plans


class EvoViT(Method):
    name = "evovit"
    summary = ("Evo-ViT: slow-fast token evolution; informative tokens (by global class attention) take "
               "the full block, placeholders a cheap shared update, spatial layout kept")
    needs_class_token = True
    options = (
        OptionInfo("keep_rate", 0.5, "share of patch tokens that are informative (slow path), in (0, 1]; or one per stage"),
        OptionInfo("alpha", 0.5, "global class attention update g = (1-alpha) g + alpha A_cls, in [0, 1]"),
        OptionInfo("stages", None, "blocks where evolution stages start (each lasts until the next); default 1/4, 1/2, 3/4 of the depth ([3, 6, 9] for 12 blocks)"),
        OptionInfo("split", "stage", "stage: split once per stage (authors' DeiT code); block: re-split every block (paper, layer-wise)"),
        OptionInfo("update", "representative", "placeholders: representative (paper, fast path) or carry (unchanged, authors' DeiT code)"),
        OptionInfo("pool", "model", "classifier input: model (the model's own head), mean (mean of patch tokens); "
                                    "LeViT also token (the class token) or both (the two heads' logits averaged)"),
        OptionInfo("class_token", None, "LeViT: add (a new learned class token, the paper's way, for training; the "
                                        "default) or mean (class attention of the mean query: training-free)"),
        OptionInfo("starts", None, "LeViT: first evolution block of each stage; default the paper's LeViT setting: "
                                   "block 2 of the first stage, block 0 of the others"),
    )
    families = ("vit", "levit")

    def validate(self) -> None:
        c = self.config
        rates = c["keep_rate"] if isinstance(c["keep_rate"], (list, tuple)) else [c["keep_rate"]]
        if not rates:
            raise TokenSparseError("keep_rate must be a number in (0, 1] or a non-empty list of them")
        for r in rates:
            check_keep_rate(r)
        a = c["alpha"]
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            raise TokenSparseError(f"alpha must be a number in [0, 1], got {a!r}")
        s = c["stages"]
        if s is not None:
            if isinstance(s, int) and not isinstance(s, bool):
                s = [s]
            if not isinstance(s, (list, tuple)) or not s or any(
                    isinstance(v, bool) or not isinstance(v, int) for v in s):
                raise TokenSparseError(f"stages must be a non-empty list of block indices, got {c['stages']!r}")
            if list(s) != sorted(set(s)) or s[0] < 1:
                raise TokenSparseError(
                    f"stages must be increasing block indices >= 1 (block 0 computes the first global "
                    f"attention), got {list(s)}")
        check_choice(c["split"], "split", SPLITS)
        check_choice(c["update"], "update", UPDATES)
        check_choice(c["pool"], "pool", POOLS)
        if c["class_token"] is not None:
            check_choice(c["class_token"], "class_token", CLASS_TOKENS)
        t = c["starts"]
        if t is not None and (not isinstance(t, (list, tuple)) or not t or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in t)):
            raise TokenSparseError(f"starts must be a list of block indices >= 0, one per LeViT stage, got {t!r}")

    def resolve_stages(self, depth: int) -> list[int]:
        """The stage starts for a model of ``depth`` blocks (validated against it)."""
        s = self.config["stages"]
        if s is None:
            stages = default_stages(depth)
            if not stages:
                raise TokenSparseError("evovit needs a model with at least 2 blocks")
            return stages
        stages = [s] if isinstance(s, int) else list(s)
        if stages[-1] >= depth:
            raise TokenSparseError(
                f"stage start {stages[-1]} is outside the model's blocks: valid stage starts are 1..{depth - 1}")
        return stages

    def apply(self, model: nn.Module) -> None:
        from ..patch import model_family
        if model_family(model) == "levit":
            self.apply_levit(model)
        else:
            self.apply_vit(model)

    def apply_vit(self, model: nn.Module) -> None:
        """Evolution stages over the blocks of a timm ViT."""
        check_vit(model, True, self.name)
        c = self.config
        for name in ("class_token", "starts"):
            if c[name] is not None:
                raise TokenSparseError(f"option {name!r} applies to LeViT models only")
        if c["pool"] not in ("model", "mean"):
            raise TokenSparseError(f"pool={c['pool']} applies to LeViT models only; ViTs take pool=model or pool=mean")
        if c["pool"] == "mean" and type(model).forward_head is not VisionTransformer.forward_head:
            raise TokenSparseError(
                f"pool=mean needs a model whose head pools tokens; {type(model).__name__} has its own head "
                f"(use pool=model)")
        depth = len(model.blocks)
        stages = self.resolve_stages(depth)
        rates = c["keep_rate"] if isinstance(c["keep_rate"], (list, tuple)) else [c["keep_rate"]] * len(stages)
        if len(rates) != len(stages):
            raise TokenSparseError(f"keep_rate has {len(rates)} entries but there are {len(stages)} stages {stages}")
        plans = stage_plans(depth, stages, rates, c["split"], c["update"])
        install(model, {}, state=EvoState(num_prefix=model.num_prefix_tokens), model_cls=EvoViTVisionTransformer,
                block_cls=EvoViTBlock)
        model._ts_pool = c["pool"]
        for i, blk in enumerate(model.blocks):
            blk._ts_plan = plans.get(i, EvoPlan())
            blk._ts_alpha = float(c["alpha"])

    def apply_levit(self, model: nn.Module) -> None:
        """Evolution inside each stage of a timm LeViT (see :class:`EvoLevitStage`)."""
        from ..patch.levit import check_levit, stage_grid
        check_levit(model, self.name)
        c = self.config
        if c["stages"] is not None or c["split"] != "stage":
            raise TokenSparseError("options 'stages' and 'split' apply to ViTs; for LeViT use starts=[...] "
                                   "(evolution is split once per stage)")
        n = len(model.stages)
        depths = [len(st.blocks) for st in model.stages]
        starts = list(c["starts"]) if c["starts"] is not None else levit_default_starts(n)
        rates = list(c["keep_rate"]) if isinstance(c["keep_rate"], (list, tuple)) else [c["keep_rate"]] * n
        for name, values in (("starts", starts), ("keep_rate", rates)):
            if len(values) != n:
                raise TokenSparseError(f"{name} has {len(values)} entries but this LeViT has {n} stages")
        if starts[0] < 1:
            raise TokenSparseError(f"starts[0] must be >= 1 (block 0 of the first stage computes the first global "
                                   f"attention), got {starts[0]}")
        class_token = c["class_token"] or "add"
        if c["pool"] in ("token", "both") and class_token != "add":
            raise TokenSparseError(f"pool={c['pool']} needs the class token: use class_token=add")
        state = LevitEvoState(num_prefix=1 if class_token == "add" else 0)
        swap_class(model, EvoLevit)
        model._ts_state = state
        model._ts_pool = c["pool"]
        if class_token == "add":
            ref = next(model.parameters())
            model.ts_cls_token = nn.Parameter(torch.zeros(1, 1, model.embed_dim[0], device=ref.device, dtype=ref.dtype))
            nn.init.trunc_normal_(model.ts_cls_token, std=0.02)
        for i, stage in enumerate(model.stages):
            swap_class(stage, EvoLevitStage)
            stage._ts_state = state
            stage._ts_index = i
            stage._ts_grid = stage_grid(stage)
            stage._ts_plan = LevitPlan(start=min(starts[i], depths[i]), keep_rate=float(rates[i]), update=c["update"])
            stage._ts_alpha = float(c["alpha"])
            stage._ts_query = "first" if class_token == "add" else "mean"

    def remove(self, model: nn.Module) -> None:
        from ..patch import model_family
        if model_family(model) == "levit":
            for stage in model.stages:
                for attr in ("_ts_state", "_ts_index", "_ts_grid", "_ts_plan", "_ts_alpha", "_ts_query"):
                    stage.__dict__.pop(attr, None)
            model._parameters.pop("ts_cls_token", None)
        else:
            for blk in model.blocks:
                for attr in ("_ts_state", "_ts_index", "_ts_plan", "_ts_alpha"):
                    blk.__dict__.pop(attr, None)
        for attr in ("_ts_state", "_ts_pool"):
            model.__dict__.pop(attr, None)


# ----------------------------------------------------------------------------- LeViT

def levit_default_starts(num_stages: int) -> list[int]:
    """The paper's LeViT setting: evolution from block 2 of the first stage and block 0 of the others."""
    return [2] + [0] * (num_stages - 1)


@dataclass(frozen=True)
class LevitPlan:
    """One LeViT stage: evolution from block ``start`` (none if it is past the last block)."""
    start: int
    keep_rate: float
    update: str


class LevitEvoState(TokenState):
    """Per-pass state of an Evo-LeViT: global class attention over the current stage's grid."""

    def __init__(self, num_prefix: int) -> None:
        super().__init__(num_prefix=num_prefix)
        self.g: Optional[Tensor] = None

    def begin(self) -> None:
        """Start a forward pass."""
        self.g, self.locations = None, []

    def finish(self) -> None:
        self.g = None  # drop this pass's tensors (and graph)

    def record_stage_block(self, stage: int, block: int, grid: tuple[int, int], split: _Split) -> None:
        """Store a :class:`LocationInfo` for an evolution block (identity layout, sizes one)."""
        B, n = split.informative.shape
        dev = split.informative.device
        self.locations.append(LocationInfo(
            block=block, num_prefix=self.num_prefix, size=torch.ones(B, self.num_prefix + n, device=dev),
            patch_to_token=(torch.arange(n, device=dev) + self.num_prefix).expand(B, -1),
            extra={"informative": split.informative.detach(), "global_attention": self.g.detach()},
            grid=grid, stage=stage))


class EvoLevitStage(LevitStage):
    """timm ``LevitStage`` on tokens ``(B, P + N, C)`` (a class token in front when ``P == 1``).

    Its downsampling carries the class token (it queries for itself) and subsamples the global
    class attention; from block ``start`` on, the informative tokens (by global class
    attention) and the representative of the placeholders run the blocks, with LeViT's
    attention biases gathered for the informative tokens (zero for tokens without a grid
    position); the full map is restored at the end of the stage.
    """
    _ts_state: LevitEvoState
    _ts_index: int
    _ts_grid: tuple[int, int]
    _ts_plan: LevitPlan
    _ts_alpha: float
    _ts_query: str

    def forward(self, x: Tensor) -> Tensor:
        from ..patch.levit import block_tokens, downsample_tokens, gather_bias, pad_bias, subsample
        state, plan, alpha, query = self._ts_state, self._ts_plan, self._ts_alpha, self._ts_query
        P = state.num_prefix
        if isinstance(self.downsample, LevitDownsample):
            ad = self.downsample.attn_downsample
            x, row = downsample_tokens(self.downsample, x, P, query)
            if state.g is not None:
                g = subsample(state.g, ad.resolution, ad.stride)
                new = update_global_attention(g, subsample(row, ad.resolution, ad.stride), alpha)
                state.g = new * (state.g.sum(dim=1, keepdim=True) / new.sum(dim=1, keepdim=True))  # authors' rescale
        n = self._ts_grid[0] * self._ts_grid[1]
        split: Optional[_Split] = None
        for i, blk in enumerate(self.blocks):
            bias = blk.attn.get_attention_biases(x.device)
            if i == plan.start and keep_count(plan.keep_rate, n) < n:
                x, split = open_stage(x, state.g, P, plan.keep_rate, plan.update)
            if split is None:
                x, row = block_tokens(blk, x, pad_bias(bias, P, 0), query)
                state.g = update_global_attention(state.g, row[:, P:], alpha)
                continue
            k, extra = split.inf_idx.shape[1], int(split.rep is not None)
            x, row = block_tokens(blk, x, pad_bias(gather_bias(bias, split.inf_idx), P, extra), query)
            g_inf = update_global_attention(state.g.gather(1, split.inf_idx), row[:, P:P + k], alpha)
            state.g = state.g.scatter(1, split.inf_idx, g_inf)
            state.record_stage_block(self._ts_index, i, self._ts_grid, split)
        return x if split is None else close_stage(x, split, P)


class EvoLevit(Levit):
    """timm ``Levit`` running its stages on tokens, with an optional new class token in front.

    ``forward_features`` returns tokens ``(B, P + N, C)`` in both LeViT variants;
    ``forward_head`` classifies the mean of the patch tokens (LeViT's own head), the class
    token, or both (logits averaged), through the model's own head(s).
    """
    _ts_state: LevitEvoState
    _ts_pool: str

    def forward_features(self, x: Tensor) -> Tensor:
        from ..patch.levit import stem_tokens
        state = self._ts_state
        state.begin()
        x = stem_tokens(self, x)
        expected = self.stages[0]._ts_grid
        if x.shape[1] != expected[0] * expected[1]:
            size = tuple(int(v) for v in self.stages[0].blocks[0].attn.resolution)
            raise TokenSparseError(
                f"this LeViT was built for a {size[0]}x{size[1]} token grid ({size[0] * 16} px images: "
                f"timm.create_model(..., img_size=...) sets it); the input gives {x.shape[1]} tokens")
        if state.num_prefix:
            x = torch.cat([self.ts_cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: Tensor) -> Any:
        try:
            return self.forward_head(self.forward_features(x))
        finally:
            self._ts_state.finish()

    def _head(self, v: Tensor, pre_logits: bool) -> Any:
        """timm's own head on pooled features ``v`` ``(B, C)``."""
        shaped = v.view(v.shape[0], -1, 1, 1) if self.use_conv else v.unsqueeze(1)
        return super().forward_head(shaped, pre_logits=pre_logits)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Any:
        P = self._ts_state.num_prefix
        pool = self._ts_pool
        if pool == "token":
            return self._head(x[:, 0], pre_logits)
        mean = self._head(x[:, P:].mean(dim=1), pre_logits)
        if pool != "both":
            return mean
        token = self._head(x[:, 0], pre_logits)
        if isinstance(mean, tuple):
            return tuple((a + b) / 2 for a, b in zip(mean, token))
        return (mean + token) / 2

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        raise TokenSparseError("forward_intermediates is not available on a LeViT patched with evovit "
                               "(its tokens carry a class token); use forward_features")

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

Hierarchical token families (timm ``levit_*`` and ``levit_conv_*``): evolution runs inside
each stage (from block 2 of the first stage and block 0 of the others, keep 0.5: the paper's
LeViT setting, option ``starts``), with LeViT's attention biases gathered for the informative
tokens; every stage's downsampling sees the complete, restored map and subsamples the global
attention. LeViT has no class token: ``class_token="add"`` (default, the paper's way) adds a
learned one that every attention and downsampling carries, for training from scratch;
``class_token="mean"`` adds nothing and takes class attention from the mean query, which keeps
pretrained weights usable without training. ``pool`` picks the classifier input: ``model``
/ ``mean`` (LeViT's own mean of tokens), ``token`` (the class token) or ``both`` (logits
averaged), always through the model's own head(s).

Per-location records (``tokensparse.location_records(model)``): one :class:`LocationInfo` per evolution
block. No token is ever dropped, so ``size`` is all ones ``(B, P + N0)`` and
``patch_to_token`` is the identity position map (restored layout). ``extra["informative"]``:
``(B, N0)`` bool, the patches that took the slow path in that block;
``extra["global_attention"]``: ``(B, N0)`` ``g`` after the block.
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import TokenSparseError
from ..families import AttentionExtras, BlockHook, TokenFamily, get_family
from ..ops import gather_tokens, scatter_tokens, split_topk
from ..state import LocationInfo, TokenState
from .base import Method
from .options import OptionInfo, check_choice, check_keep_rate, default_locations, keep_count

AUTHORS_DEIT = "evovit:stages=[4,8],update=carry,keep_rate=0.5,alpha=[1,1,1,1,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5]"
"""The authors' DeiT setting (YifanXu74/Evo-ViT ``evo_deit_*_patch16_224``: ``tradeoff`` and
``prune_ratio`` lists, stages split at blocks 4 and 8, placeholders carried) for a 12-block ViT;
add ``pool=mean`` for their from-scratch classifier (``head(norm(mean(tokens)))``)."""
UPDATES = ("representative", "carry")
SPLITS = ("stage", "block")
POOLS = ("model", "mean", "token", "both")
CLASS_TOKENS = ("add", "mean")


# ----------------------------------------------------------------------------- pure tensor functions

def update_global_attention(g: Tensor | None, a: Tensor, alpha: float) -> Tensor:
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


def restore_placeholders(x_patch: Tensor, inf_idx: Tensor, y_inf: Tensor, delta: Tensor | None) -> Tensor:
    """Complete patch map: ``x_patch`` ``(B, n, C)`` moved by ``delta`` ``(B, 1, C)`` (if any),
    with the informative tokens' new values ``y_inf`` ``(B, k, C)`` written at ``inf_idx``."""
    base = x_patch if delta is None else x_patch + delta
    return scatter_tokens(base, inf_idx, y_inf)


def default_stages(depth: int) -> list[int]:
    """Stage starts at 1/4, 1/2 and 3/4 of the depth (``[3, 6, 9]`` for 12 blocks).

    The blocks every location-based method of this package defaults to; block 0 is left out.
    """
    return [b for b in default_locations(depth) if b >= 1]


def levit_default_starts(num_stages: int) -> list[int]:
    """The paper's LeViT setting: evolution from block 2 of the first stage and block 0 of the others."""
    return [2] + [0] * (num_stages - 1)


# ----------------------------------------------------------------------------- per-pass state

@dataclass
class _Split:
    """One stage's split: the full patch map at its start and what went where."""
    x_patch: Tensor              # (B, n, C) patch tokens at the stage start, original positions
    inf_idx: Tensor              # (B, k) informative patch indices (ascending)
    informative: Tensor          # (B, n) bool mask of inf_idx
    rep: Tensor | None        # (B, 1, C) representative token at the stage start, or None


class EvoState(TokenState):
    """:class:`TokenState` plus the global class attention ``g`` over the current grid and the open split.

    ``query``: which attention row is the class attention: ``"cls_attn"`` (the class token)
    or ``"mean_attn"`` (the mean query, for models without one).
    """

    def __init__(self, num_prefix: int, alpha: float, query: str = "cls_attn", pool: str | None = None) -> None:
        super().__init__(num_prefix=num_prefix, pool=pool)
        self.alpha, self.query = alpha, query
        self.downsample_needs = frozenset({query})

    def reset(self) -> None:
        super().reset()
        self.g: Tensor | None = None
        self.split: _Split | None = None

    def finish(self) -> None:
        super().finish()
        self.g = None          # drop references to this pass's tensors (and graph)
        self.split = None

    def token_map(self) -> Tensor:
        """Inside an open stage: informative patches at their slow-path positions, placeholders -1."""
        if self.split is None:
            return self.patch_to_token
        inf_idx, P = self.split.inf_idx, self.num_prefix
        ranks = torch.arange(inf_idx.shape[1], device=inf_idx.device).expand_as(inf_idx) + P
        return torch.full_like(self.patch_to_token, -1).scatter(1, inf_idx, ranks)

    def row(self, extras: AttentionExtras) -> Tensor:
        """The class-attention row ``(B, N)`` summed over heads."""
        return getattr(extras, self.query).sum(dim=1)

    def on_downsample(self, extras: AttentionExtras, resample: Callable[[Tensor], Tensor]) -> None:
        """Carry ``g`` to the new grid: subsample it and the downsampling's own row, then rescale
        to the old total (the authors' LeViT code)."""
        if self.g is not None:
            new = update_global_attention(resample(self.g), resample(self.row(extras)), self.alpha)
            self.g = new * (self.g.sum(dim=1, keepdim=True) / new.sum(dim=1, keepdim=True))

    def record_evolution(self, block: int) -> None:
        """Store this block's :class:`LocationInfo` (identity layout, sizes one)."""
        P = self.num_prefix
        informative = self.split.informative
        B, n = informative.shape
        dev = informative.device
        self.locations.append(LocationInfo(
            block=block, num_prefix=P, size=torch.ones(B, P + n, device=dev),
            patch_to_token=(torch.arange(n, device=dev) + P).expand(B, -1),
            extra={"informative": informative.detach(), "global_attention": self.g.detach()},
            grid=self.grid, stage=self.stage))


def open_stage(x: Tensor, g: Tensor, num_prefix: int, keep_rate: float, update: str) -> tuple[Tensor, _Split]:
    """Split the full map ``x`` ``(B, P + n, C)`` by global attention ``g`` ``(B, n)``.

    Returns the sequence ``[prefix, informative, (representative)]`` and the :class:`_Split`
    that :func:`close_stage` needs.
    """
    P = num_prefix
    x_patch = x[:, P:]
    n = x_patch.shape[1]
    k = keep_count(keep_rate, n, "floor")
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


# ----------------------------------------------------------------------------- the block hook

@dataclass(frozen=True)
class EvoPlan:
    """What one block does: plain (just updates ``g``) or part of an evolution stage."""
    evolve: bool = False
    stage_start: bool = False
    stage_end: bool = False
    keep_rate: float = 1.0
    update: str = "representative"


class EvoHook(BlockHook):
    """Evo-ViT at one block: tracks global class attention and runs slow-fast token evolution.

    Between blocks of an open stage the sequence is ``[prefix, informative, (representative)]``;
    the stage's first block splits the full map (when the keep rate keeps fewer tokens than
    there are), its last block restores it.
    """

    def __init__(self, plan: EvoPlan, query: str, alpha: float) -> None:
        super().__init__()
        self.plan, self.alpha = plan, alpha
        self.needs = frozenset({query})

    def extra_repr(self) -> str:
        return f"{self.plan}, alpha={self.alpha}"

    def before(self, x: Tensor, state: EvoState, block: int) -> Tensor:
        plan = self.plan
        if plan.stage_start and keep_count(plan.keep_rate, state.g.shape[1], "floor") < state.g.shape[1]:
            x, state.split = open_stage(x, state.g, state.num_prefix, plan.keep_rate, plan.update)
            state.grid_positions, state.trailing = state.split.inf_idx, int(state.split.rep is not None)
        return x

    def after_attn(self, x: Tensor, extras: AttentionExtras, state: EvoState, block: int) -> Tensor:
        P, a = state.num_prefix, state.row(extras)
        split = state.split
        if split is None:
            state.g = update_global_attention(state.g, a[:, P:], self.alpha)
        else:
            k = split.inf_idx.shape[1]
            g_inf = update_global_attention(state.g.gather(1, split.inf_idx), a[:, P:P + k], self.alpha)
            state.g = state.g.scatter(1, split.inf_idx, g_inf)
        return x

    def after(self, x: Tensor, state: EvoState, block: int) -> Tensor:
        if state.split is None:
            return x
        state.record_evolution(block)
        if self.plan.stage_end:
            x = close_stage(x, state.split, state.num_prefix)
            state.split, state.grid_positions, state.trailing = None, None, 0
        return x


# ----------------------------------------------------------------------------- the method

def stage_plans(spans: list[tuple[int, int, float]], update: str) -> dict[int, EvoPlan]:
    """Per-block :class:`EvoPlan` of the evolution blocks; ``spans`` are ``(first, end, keep_rate)``
    block ranges (end exclusive), one evolution stage each. Other blocks are plain."""
    plans = {}
    for start, end, rate in spans:
        for b in range(start, end):
            plans[b] = EvoPlan(evolve=True, stage_start=b == start, stage_end=b == end - 1,
                               keep_rate=rate, update=update)
    return plans


def flat_spans(depth: int, stages: list[int], keep_rates: list[float], split: str) -> list[tuple[int, int, float]]:
    """Evolution stages of a single-stage model: each lasts until the next start or the end.

    With ``split="block"`` every block from ``stages[0]`` on is a one-block stage, with the
    keep rate of the stage it falls in.
    """
    if split == "block":
        keep_rates = [keep_rates[bisect_right(stages, b) - 1] for b in range(stages[0], depth)]
        stages = list(range(stages[0], depth))
    bounds = list(stages) + [depth]
    return list(zip(bounds[:-1], bounds[1:], keep_rates))


class EvoViT(Method):
    name = "evovit"
    summary = ("Evo-ViT: slow-fast token evolution; informative tokens (by global class attention) take "
               "the full block, placeholders a cheap shared update, spatial layout kept. The authors' DeiT "
               "setting: " + AUTHORS_DEIT)
    options = (
        OptionInfo("keep_rate", 0.5, "share of patch tokens that are informative (slow path), in (0, 1]; or one per stage"),
        OptionInfo("alpha", 0.5, "global class attention update g = (1-alpha) g + alpha A_cls, in [0, 1]; or one "
                                 "per block (ViTs; the authors' DeiT code: 1 before the first stage, then 0.5)"),
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

    @classmethod
    def supports_family(cls, family: type) -> bool:
        """Token families, but those whose models have no class token and cannot take one."""
        return issubclass(family, TokenFamily) and (family.class_token_models is not False or family.can_add_class_token)

    def supports(self, model: nn.Module) -> bool:
        """Any token family with a class token, or one that can take a new one (LeViT)."""
        try:
            family = get_family(model)
        except TokenSparseError:
            return False
        return self.supports_family(type(family)) and (family.has_class_token or family.can_add_class_token)

    def validate(self) -> None:
        c = self.config
        rates = c["keep_rate"] if isinstance(c["keep_rate"], (list, tuple)) else [c["keep_rate"]]
        if not rates:
            raise TokenSparseError("keep_rate must be a number in (0, 1] or a non-empty list of them")
        for r in rates:
            check_keep_rate(r)
        alphas = c["alpha"] if isinstance(c["alpha"], (list, tuple)) else [c["alpha"]]
        if not alphas:
            raise TokenSparseError("alpha must be a number in [0, 1] or a list of them, one per block")
        for a in alphas:
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

    def alphas(self, depth: int, hierarchical: bool) -> list[float]:
        """``alpha`` of every block: one value for all, or a list with one entry per block (ViTs)."""
        a = self.config["alpha"]
        if not isinstance(a, (list, tuple)):
            return [float(a)] * depth
        if hierarchical:
            raise TokenSparseError("a list of alpha values applies to ViTs; LeViT takes one alpha")
        if len(a) != depth:
            raise TokenSparseError(f"alpha has {len(a)} entries but the model has {depth} blocks (give one per block)")
        return [float(v) for v in a]

    def prepare(self, model: nn.Module, family: TokenFamily) -> Callable[[], None]:
        family.check(self.name)
        c = self.config
        hierarchical = len(family.stage_depths) > 1
        if c["pool"] not in family.pools:
            raise TokenSparseError(f"pool={c['pool']} applies to LeViT models only; {family.description} takes "
                                   f"pool={' or pool='.join(family.pools)}")
        if hierarchical:
            spans, class_token = self.hierarchical_spans(family.stage_depths), c["class_token"] or "add"
            if c["pool"] in ("token", "both") and class_token != "add":
                raise TokenSparseError(f"pool={c['pool']} needs the class token: use class_token=add")
        else:
            for name in ("class_token", "starts"):
                if c[name] is not None:
                    raise TokenSparseError(f"option {name!r} applies to LeViT models only")
            family.require_class_token(self.name)
            if c["pool"] == "mean" and not family.head_pools_tokens:
                raise TokenSparseError(
                    f"pool=mean needs a model whose head pools tokens; {type(model).__name__} has its own head "
                    f"(use pool=model)")
            spans, class_token = self.flat_spans(family.depth), None
        alphas = self.alphas(family.depth, hierarchical)
        query = "mean_attn" if class_token == "mean" else "cls_attn"
        pool = None if c["pool"] == "model" else c["pool"]
        plans = stage_plans(spans, c["update"])
        hooks = {b: EvoHook(plans.get(b, EvoPlan()), query, alphas[b]) for b in range(family.depth)}

        def install() -> None:
            if class_token == "add":
                family.add_class_token()
            state = EvoState(num_prefix=family.num_prefix, alpha=alphas[0], query=query, pool=pool)
            family.install(state, hooks)
        return install

    def flat_spans(self, depth: int) -> list[tuple[int, int, float]]:
        """Evolution stages over the blocks of a single-stage model (ViT)."""
        c = self.config
        stages = self.resolve_stages(depth)
        rates = c["keep_rate"] if isinstance(c["keep_rate"], (list, tuple)) else [c["keep_rate"]] * len(stages)
        if len(rates) != len(stages):
            raise TokenSparseError(f"keep_rate has {len(rates)} entries but there are {len(stages)} stages {stages}")
        return flat_spans(depth, stages, [float(r) for r in rates], c["split"])

    def hierarchical_spans(self, depths: list[int]) -> list[tuple[int, int, float]]:
        """One evolution stage inside each model stage, from its ``starts`` block to its end (LeViT)."""
        c = self.config
        if c["stages"] is not None or c["split"] != "stage":
            raise TokenSparseError("options 'stages' and 'split' apply to ViTs; for LeViT use starts=[...] "
                                   "(evolution is split once per stage)")
        n = len(depths)
        starts = list(c["starts"]) if c["starts"] is not None else levit_default_starts(n)
        rates = list(c["keep_rate"]) if isinstance(c["keep_rate"], (list, tuple)) else [c["keep_rate"]] * n
        for name, values in (("starts", starts), ("keep_rate", rates)):
            if len(values) != n:
                raise TokenSparseError(f"{name} has {len(values)} entries but this LeViT has {n} stages")
        if starts[0] < 1:
            raise TokenSparseError(f"starts[0] must be >= 1 (block 0 of the first stage computes the first global "
                                   f"attention), got {starts[0]}")
        spans, offset = [], 0
        for depth, start, rate in zip(depths, starts, rates):
            if start < depth:
                spans.append((offset + start, offset + depth, float(rate)))
            offset += depth
        return spans

"""PiToMe: merge tokens by an energy score that protects the isolated ones (Tran et al., NeurIPS 2024).

Follows the authors' code (hchautran/PiToMe, commit 550b5de: ``algo/pitome/merge.py``,
``pitome_vision``, ``pitome_bsm`` and ``pitome``; ``algo/pitome/patch/timm.py`` and ``deit.py``):

- in each block, after the attention residual, the patch tokens' keys (averaged over heads)
  give the cosine similarities ``sim``, and each token an energy ``mean_j elu(sim_ij - m)``
  (:func:`~tokensparse.ops.energy_scores`): high for a token in a dense cluster, low for an
  isolated, informative one. The margin ``m`` falls with depth: ``0.75 (1 - i / depth)`` in block ``i``;
- ``r = floor(n - n * ratio)`` of the ``n`` patch tokens merge per block;
- in the first ``ceil(depth / 2)`` blocks the tokens, ranked by falling energy, alternate into sets
  A and B, and ToMe's bipartite matching merges the ``r`` A tokens most similar to their best B
  token (their ``pitome_bsm``);
- in the later blocks the ``2 r`` highest-energy tokens alternate into A and B, every A token
  merges into its most similar B token, and the other tokens are protected (their ``pitome``);
- merged tokens are size-weighted averages and sizes add up (their ``merge_wavg``; computed on the
  merged groups only, :func:`~tokensparse.methods.base.merge_into`).

Where we differ: proportional attention is on by default (``prop_attn``): the authors' timm patch
computes the sizes but never passes them to the attention (``self.attn(self.norm1(x))``), so
their image models run without it; ``prop_attn=false`` is their code. ``r`` (a count per block)
may replace ``ratio``, which :func:`tune` uses. Prefix tokens are never merged (their code strips
the class token only).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..families import AttentionExtras
from ..ops import energy_scores_, gather_tokens, group_assignment
from ..state import TokenState
from .base import BlockReducerMethod, CountReducer, TokenReducer, merge_into
from .options import OptionInfo, block_counts, check_count, check_counts, check_number, r_option


def _cross(unit: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Cosine similarities ``(B, len(rows), len(cols))`` between the tokens ``rows`` and ``cols`` of the
    unit-norm metric ``unit`` ``(B, n, D)`` (gathered rows and one product: cheaper than gathering
    from the ``(B, n, n)`` similarities element by element)."""
    return gather_tokens(unit, rows) @ gather_tokens(unit, cols).transpose(-1, -2)


def unit_energy(unit: Tensor, margin: float, alpha: float) -> Tensor:
    """PiToMe's energy ``(B, n)`` of unit-norm tokens ``unit`` ``(B, n, D)`` from their whole ``n x n``
    cosine similarities (:func:`~tokensparse.ops.energy_scores`): the score ToMe's matching does not need."""
    return energy_scores_(unit @ unit.transpose(-1, -2), margin, alpha)


def pitome_groups(metric: Tensor, r: int, margin: float, alpha: float, bsm: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Merging ``r`` of the ``n`` tokens of ``metric`` ``(B, n, D)`` (PiToMe's keys) as ``(keep, src, dst)``:
    the tokens kept ``(B, n - r)`` in their new order, the tokens merged ``(B, r)`` and the index into
    ``keep`` of the token each merges into ``(B, r)`` (:func:`~tokensparse.methods.base.merge_into`).

    New order as the authors' code: with ``bsm``, the A tokens left (by falling match score) then
    set B; without, the protected tokens (by falling energy) then set B.
    """
    unit = F.normalize(metric.float(), dim=-1)
    order = unit_energy(unit, margin, alpha).argsort(dim=-1, descending=True)
    if bsm:
        a_idx, b_idx = order[:, ::2], order[:, 1::2]
        best, partner = _cross(unit, a_idx, b_idx).max(dim=-1)
        edge = best.argsort(dim=-1, descending=True)
        left = a_idx.gather(1, edge[:, r:])
        return torch.cat([left, b_idx], dim=1), a_idx.gather(1, edge[:, :r]), partner.gather(1, edge[:, :r]) + left.shape[1]
    merge_idx = order[:, :2 * r]
    a_idx, b_idx = merge_idx[:, ::2], merge_idx[:, 1::2]
    protected = order[:, 2 * r:]
    return torch.cat([protected, b_idx], dim=1), a_idx, _cross(unit, a_idx, b_idx).argmax(dim=-1) + protected.shape[1]


def pitome_assignment(metric: Tensor, r: int, margin: float, alpha: float, bsm: bool) -> Tensor:
    """Patch map ``(B, n)`` for merging ``r`` of the ``n`` tokens of ``metric`` ``(B, n, D)`` (:func:`pitome_groups`)."""
    return group_assignment(metric.shape[1], None, *pitome_groups(metric, r, margin, alpha, bsm))


class PiToMeReducer(CountReducer):
    """Merge ``r`` (or ``floor(n - n * ratio)``) patch tokens by energy-guided matching."""
    needs = frozenset({"keys"})
    settings = ("ratio", "margin", "alpha", "bsm")

    def __init__(self, r: int | None, ratio: float, margin: float, alpha: float, bsm: bool) -> None:
        super().__init__(r)
        self.ratio, self.margin, self.alpha, self.bsm = ratio, margin, alpha, bsm

    @property
    def idle(self) -> bool:
        return self.r == 0 if self.r is not None else self.ratio >= 1.0

    def count(self, n: int) -> int:
        """Tokens merged out of ``n`` patch tokens: ``r``, or the authors' ``floor(n - n * ratio)``; at most ``n // 2``."""
        r = self.r if self.r is not None else (math.floor(n - n * self.ratio) if self.ratio < 1.0 else 0)
        return max(0, min(r, n // 2))

    def reduce(self, x: Tensor, extras: AttentionExtras, state: TokenState, r: int) -> Tensor:
        P = state.num_prefix
        return merge_into(x, *pitome_groups(extras.keys[:, P:], r, self.margin, self.alpha, self.bsm), state)


class PiToMe(BlockReducerMethod):
    name = "pitome"
    summary = "PiToMe: merge the tokens with the highest energy (many close neighbours), protect isolated ones"
    options = (
        OptionInfo("ratio", 0.9, "share of the patch tokens kept in every block, in [0.5, 1] (the authors' knob)"),
        r_option(None, "merged", "; replaces ratio"),
        OptionInfo("margin", 0.75, "energy margin in block 0, falling linearly to 0 at the depth (the authors')"),
        OptionInfo("alpha", 1.0, "ELU alpha of the energy"),
        OptionInfo("bsm_blocks", None, "how many first blocks merge by energy-ordered bipartite matching; "
                                       "default ceil(depth / 2) (the authors')"),
        OptionInfo("prop_attn", True, "proportional attention (the authors' timm patch: off)"),
    )

    def validate(self) -> None:
        c = self.config
        check_number(c["ratio"], "ratio", 0.5, 1.0)
        check_counts(c["r"], optional=True)
        check_number(c["margin"], "margin", -1.0, 1.0)
        check_number(c["alpha"], "alpha", 0, low_open=True)
        if c["bsm_blocks"] is not None:
            check_count(c["bsm_blocks"], "bsm_blocks")
        self.use_prop_attn()

    def build_reducers(self, depth: int) -> dict[int, TokenReducer]:
        c = self.config
        r = c["r"]
        rs: list[int | None]
        if r is None:
            rs = [None] * depth
        else:
            rs = list(block_counts(r, depth)) if isinstance(r, (list, tuple)) else [r] * depth
        bsm = math.ceil(depth * 0.5) if c["bsm_blocks"] is None else c["bsm_blocks"]
        return {i: PiToMeReducer(rs[i], c["ratio"], c["margin"] * (1 - i / depth), c["alpha"], i < bsm)
                for i in range(depth)}

"""MCTF: multi-criteria token fusion with one-step-ahead attention (Lee et al., CVPR 2024).

Follows the authors' code (mlvlab/MCTF, commit 2004da0: ``utils/mctf.py``,
``models/modules/blocks.py``, ``models/deit.py``) at their evaluation setting
(``--mctf_type [16,0,0,1,1,1,20,40,1,1,0] --activate_layer [1,...,11]``):

- in each merging block, the tokens themselves (not the keys) are matched bipartitely, A and
  B alternating over the sequence, with the score ``similarity ** (1 / tau_sim) x
  informativeness ** (1 / tau_info) x size ** (1 / tau_size)`` (:func:`~tokensparse.ops.mctf_scores`);
  informativeness is the inverse of the mean attention a token receives (over heads and
  queries), size the inverse token size, each normalised by its maximum;
- bidirectional matching: ``r // 2`` tokens of A merge into B, then ``r - r // 2`` of B into
  what is left of A (:func:`~tokensparse.ops.mctf_assignment`), in the authors' token order;
- merged tokens are averages weighted by attention received x size (``pooling="attention"``);
  sizes add up, and proportional attention adds ``log(size)`` to the attention logits;
- one-step-ahead attention: the block's attention on the unmerged tokens decides the merge
  before its output is computed, and each merged token's attention row is its group's
  weighted average (the attention to a merged key the sum over its members), applied to the
  merged tokens' values; the rest of the block runs on the merged tokens. With
  ``one_step_ahead=false`` the block runs whole and its own attention decides a merge after it.
- at most ``(N - P) // 2`` tokens merge in a block, and at least 10 tokens are left (theirs).

The default differs from their evaluation setting in one option, ``one_step_ahead=false``,
chosen by measuring both forms on the shared images at equal GMACs
(``benchmarks/results/mctf_faithfulness.txt``): merging after the block was closer to the
unreduced model in KL at each of three GMACs levels (0.778: 0.036 against 0.045 at the same
95.4% agreement), and it needs no merged attention. Their whole setting is :data:`AUTHORS`.
The temperatures are the code's (``tau_sim=1, tau_info=20, tau_size=40``, each criterion
raised to ``1 / tau``); the authors' tracker (issue #3) notes that the paper's description
of the temperatures differs from the code.

Prefix tokens (class, distillation, registers) are never merged; the authors' code protects
the first ``P`` tokens of set A, which is the class token alone when ``P = 1`` (what differs
for ``P > 1`` is theirs, not followed). Informativeness needs no class token: every query
counts, so models without one (SigLIP) are supported as they are.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import TokenSparseError
from ..families import AheadMerge, AttentionExtras
from ..ops import group_weights, mctf_assignment, mctf_scores, sum_tokens, with_prefix
from ..state import TokenState
from .base import BlockReducerMethod, TokenReducer
from .options import PROP_ATTN, OptionInfo, block_counts, check_bool, check_choice, check_counts

POOLINGS = ("attention", "size", "mean")
"""How merged tokens are averaged: by attention received x size (the authors' setting, their
``pooling_type`` 1), by size (0, ToMe's), unweighted (3)."""

AUTHORS = "mctf:r=16,one_step_ahead=true"
"""The authors' evaluation setting (``--mctf_type [16,0,0,1,1,1,20,40,1,1,0]``, blocks 1..11) as a spec."""

MIN_TOKENS = 10
"""The authors' code leaves at least this many tokens in a block (``if t - r < 10: r = t - 10``)."""


def default_r(depth: int) -> int:
    """``r`` per merging block at the default: 16 at depth 12 (the authors' setting), the same total
    over the ``depth - 1`` merging blocks of other depths."""
    return max(1, round(16 * 11 / max(depth - 1, 1)))


class MCTFReducer(TokenReducer):
    """Merge ``r`` tokens of a block by multi-criteria bipartite matching (MCTF)."""

    def __init__(self, r: int, tau_sim: float, tau_info: float, tau_size: float, bidirectional: bool,
                 pooling: str, one_step_ahead: bool) -> None:
        super().__init__()
        self.r, self.bidirectional, self.pooling = r, bidirectional, pooling
        self.taus = (tau_sim, tau_info, tau_size)
        self.merges_ahead = one_step_ahead
        self.needs = frozenset() if one_step_ahead else frozenset({"received"})

    def extra_repr(self) -> str:
        t = self.taus
        return (f"r={self.r}, tau_sim={t[0]}, tau_info={t[1]}, tau_size={t[2]}, bidirectional={self.bidirectional}, "
                f"pooling={self.pooling}, one_step_ahead={self.merges_ahead}")

    @property
    def idle(self) -> bool:
        return self.r == 0

    def count(self, n: int, num_prefix: int) -> int:
        """Tokens merged out of ``n`` (prefix included): ``r``, at most half the patch tokens, at
        least :data:`MIN_TOKENS` left."""
        return max(0, min(self.r, n - MIN_TOKENS, (n - num_prefix) // 2))

    def merge(self, x: Tensor, received: Tensor, state: TokenState, block: int) -> AheadMerge | None:
        """Merge ``x`` ``(B, N, C)`` (also the similarity metric) given the attention each token
        received ``(B, N)``; updates and records ``state``."""
        P, N = state.num_prefix, x.shape[1]
        r = self.count(N, P)
        if r == 0:
            state.record(block, x)
            return None
        received = received.detach().float()
        scores, a_start = mctf_scores(x.detach(), received, state.size, P, *self.taus)
        assign = with_prefix(mctf_assignment(scores, r, a_start, sort_unmerged=P > 0, bidirectional=self.bidirectional),
                             P)
        size = state.sizes(x).float()
        if self.pooling == "attention":
            w = received.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).tiny) * size
        elif self.pooling == "size":
            w = size
        else:
            w = torch.ones_like(size)
        n = N - r
        weights = group_weights(w, assign, n)
        merged = sum_tokens(x * weights.to(x.dtype), assign, n)
        state.update(assign, sum_tokens(size, assign, n))
        state.record(block, merged)
        return AheadMerge(merged, assign, weights)

    def merge_ahead(self, x: Tensor, attn: Tensor, state: TokenState, block: int) -> AheadMerge | None:
        return self.merge(x, attn.mean(dim=(1, 2)), state, block)

    def forward(self, x: Tensor, extras: AttentionExtras, state: TokenState, block: int) -> Tensor:
        """After the attention residual (merge after the block only): keep the attention received."""
        state.pending = extras.received
        return x

    def after(self, x: Tensor, state: TokenState, block: int) -> Tensor:
        if self.merges_ahead:
            return x
        received, state.pending = state.pending, None
        merge = self.merge(x, received, state, block)
        return x if merge is None else merge.x


def mctf_schedule(r: Any, depth: int) -> list[int]:
    """Per-block ``r``: a list as given (zeros after it), an int in blocks 1..depth-1, None the default."""
    if isinstance(r, (list, tuple)):
        return block_counts(r, depth)
    r = default_r(depth) if r is None else r
    return [0] + [r] * (depth - 1)


def check_tau(value: Any, name: str) -> float:
    """A temperature: a number >= 0 (0 turns its criterion off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise TokenSparseError(f"{name} must be a number >= 0 (0 turns the criterion off), got {value!r}")
    return float(value)


class MCTF(BlockReducerMethod):
    name = "mctf"
    summary = ("MCTF: merge tokens by similarity, informativeness and size, bidirectionally, optionally with "
               "one-step-ahead attention (training-free); the authors' setting: " + AUTHORS)
    options = (
        OptionInfo("r", None, "tokens merged per block: an int (in blocks 1..depth-1, as the authors), or a list "
                              "with one entry per block; default 16 at depth 12 (176 / (depth - 1) otherwise)"),
        OptionInfo("tau_sim", 1, "similarity temperature (score factor ((cos + 1) / 2) ** (1 / tau)); 0: off"),
        OptionInfo("tau_info", 20, "informativeness temperature (1 / attention received); 0: off"),
        OptionInfo("tau_size", 40, "size temperature (1 / token size); 0: off"),
        OptionInfo("bidirectional", True, "merge r // 2 tokens from set A into B, then the rest from B into A"),
        OptionInfo("pooling", "attention", "merged token: average weighted by attention x size, by size, or mean"),
        OptionInfo("one_step_ahead", False, "true: decide the merge from the block's attention before its "
                                            "output (the authors' setting); false: merge after the block"),
        PROP_ATTN,
    )

    @classmethod
    def supports_family(cls, family: type) -> bool:
        return super().supports_family(family) and getattr(family, "merges_ahead", False)

    def validate(self) -> None:
        c = self.config
        check_counts(c["r"], optional=True)
        for name in ("tau_sim", "tau_info", "tau_size"):
            check_tau(c[name], name)
        check_bool(c["bidirectional"], "bidirectional")
        check_choice(c["pooling"], "pooling", POOLINGS)
        check_bool(c["one_step_ahead"], "one_step_ahead")
        self.use_prop_attn()

    def build_reducers(self, depth: int) -> dict[int, TokenReducer]:
        c = self.config
        rs = mctf_schedule(c["r"], depth)
        return {i: MCTFReducer(r, c["tau_sim"], c["tau_info"], c["tau_size"], c["bidirectional"], c["pooling"],
                               c["one_step_ahead"]) for i, r in enumerate(rs) if r > 0}

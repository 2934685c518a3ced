"""ToFu: token fusion, pruning in the early blocks and MLERP merging in the later ones (Kim et al., WACV 2024).

There is no official code; this follows the paper:

- every reducing block matches tokens as ToMe does (bipartite soft matching on the keys, A and B
  alternating over the sequence, the ``r`` A tokens most similar to their best B token chosen);
- before ``switch`` (default: the second half of the blocks starts there) the chosen A tokens
  are pruned: dropped, their partner left as it was (the paper's observation: early blocks are
  far from linear, where averaging hurts more than dropping);
- from ``switch`` on they are merged by MLERP (:func:`~tokensparse.ops.mlerp_tokens`): the
  size-weighted average's direction, rescaled to the largest norm among the merged tokens,
  which keeps the norm distribution that averaging would shrink.

Sizes add up when tokens merge (a pruned token takes its patches with it), and proportional
attention adds ``log(size)`` to the logits, as ToMe. Where the paper is silent we follow ToMe's
code: at most half the patch tokens go per block, prefix tokens are never touched; MLERP of more
than two tokens uses the average of all of them (the paper defines it for pairs).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import TokenSparseError
from ..families import AttentionExtras
from ..ops import bipartite_soft_matching, group_assignment, mlerp_tokens, with_prefix
from ..state import TokenState
from .base import BlockReducerMethod, CountReducer, TokenReducer, merge_patches, prune_to
from .options import PROP_ATTN, OptionInfo, check_choice, check_count, check_counts, r_option
from .tome import tome_schedule

MODES = ("prune", "mlerp", "average")
"""What a reducing block does with the tokens it matched: drop them, merge by MLERP, or average (ToMe)."""


def match_patches(keys: Tensor, r: int, num_prefix: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ToMe's matching of ``r`` of the patch tokens on ``keys`` ``(B, N, D)``: ``(kept, into, src, dst)``
    patch positions as :func:`~tokensparse.ops.group_assignment` takes them (A tokens left, set B,
    A tokens chosen and their B partners)."""
    n = keys.shape[1] - num_prefix
    plan = bipartite_soft_matching(keys[:, num_prefix:], r, a_start=num_prefix % 2)
    a = plan.a_start
    into = torch.arange(1 - a, n, 2, device=keys.device).expand(keys.shape[0], -1)
    return 2 * plan.unm + a, into, 2 * plan.src + a, plan.dst


class ToFuReducer(CountReducer):
    """Match ``r`` patch tokens as ToMe, then prune them or merge them (MLERP or average)."""
    needs = frozenset({"keys"})
    settings = ("mode",)

    def __init__(self, r: int, mode: str) -> None:
        super().__init__(r)
        self.mode = mode

    def reduce(self, x: Tensor, extras: AttentionExtras, state: TokenState, r: int) -> Tensor:
        P = state.num_prefix
        kept, into, src, dst = match_patches(extras.keys, r, P)
        if self.mode == "prune":
            return prune_to(x, with_prefix(torch.cat([kept, into], dim=1), P), state)
        assign = group_assignment(x.shape[1] - P, kept, into, src, dst)
        return merge_patches(x, assign, x.shape[1] - P - r, state, pool=mlerp_tokens if self.mode == "mlerp" else None)


class ToFu(BlockReducerMethod):
    name = "tofu"
    summary = "ToFu: ToMe's matching; prune the matched tokens in early blocks, merge them by MLERP in later ones"
    options = (
        r_option(13, "removed"),
        OptionInfo("switch", None, "first block that merges (earlier blocks prune); default depth // 2"),
        OptionInfo("merge", "mlerp", "how blocks from switch on merge: mlerp (norm-preserving) or average (ToMe)"),
        PROP_ATTN,
    )

    def validate(self) -> None:
        c = self.config
        check_counts(c["r"])
        if c["switch"] is not None:
            check_count(c["switch"], "switch")
        check_choice(c["merge"], "merge", MODES[1:])
        self.use_prop_attn()

    def build_reducers(self, depth: int) -> dict[int, TokenReducer]:
        c = self.config
        switch = depth // 2 if c["switch"] is None else c["switch"]
        if switch > depth:
            raise TokenSparseError(f"switch must be a block index in 0..{depth} (the model has {depth} blocks), "
                                   f"got {switch}")
        rs = tome_schedule(c["r"], depth, "constant")
        return {i: ToFuReducer(r, "prune" if i < switch else c["merge"]) for i, r in enumerate(rs)}

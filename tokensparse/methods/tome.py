"""ToMe: merge the ``r`` most similar token pairs in every block (METHODS.md §2)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..families import AttentionExtras
from ..ops import bipartite_soft_matching, merge_assignment, merge_tokens
from ..state import TokenState
from .base import BlockReducerMethod, CountReducer, TokenReducer
from .options import PROP_ATTN, OptionInfo, block_counts, check_choice, check_counts, r_option


def merge_patch_tokens(x: Tensor, metric: Tensor, r: int, state: TokenState) -> Tensor:
    """Merge ``r`` patch tokens of ``x`` by bipartite matching on ``metric``, size-weighted.

    Sets A and B alternate over the whole sequence as in ToMe's reference code (the class
    token would be in A), with prefix tokens excluded from matching. Prefix tokens are untouched;
    updates ``state`` (sizes and patch-to-token map). The caller caps ``r`` at half the patch tokens.
    """
    P = state.num_prefix
    n = x.shape[1] - P
    size = state.sizes(x)
    plan = bipartite_soft_matching(metric[:, P:], r, a_start=P % 2)
    merged, merged_size = merge_tokens(x[:, P:], size[:, P:], plan)
    assign = merge_assignment(plan, n) + P
    if P:
        prefix = torch.arange(P, device=x.device).expand(x.shape[0], -1)
        assign = torch.cat([prefix, assign], dim=1)
    state.update(assign, torch.cat([size[:, :P], merged_size], dim=1))
    return torch.cat([x[:, :P], merged], dim=1)


class ToMeReducer(CountReducer):
    """Merge ``r`` patch tokens by key similarity (capped at half the patch tokens)."""
    needs = frozenset({"keys"})

    def reduce(self, x: Tensor, extras: AttentionExtras, state: TokenState, r: int) -> Tensor:
        return merge_patch_tokens(x, extras.keys, r, state)


def tome_schedule(r: Any, depth: int, schedule: str) -> list[int]:
    """Per-block ``r``: a list as given, or an int spread over blocks by ``schedule``.

    ``"constant"`` merges ``r`` in every block; ``"decreasing"`` merges the same total but
    ``1.5 r`` in the first block falling linearly to ``0.5 r`` in the last (ToMe's inflection -0.5).
    """
    if isinstance(r, (list, tuple)):
        return block_counts(r, depth)
    if schedule == "constant" or depth == 1:
        return [r] * depth
    hi, lo = 1.5 * r, 0.5 * r
    return [int(hi + (lo - hi) * i / (depth - 1)) for i in range(depth)]


class ToMe(BlockReducerMethod):
    name = "tome"
    summary = "ToMe: merge the r most similar token pairs in every block (bipartite soft matching)"
    options = (
        r_option(13, "merged"),
        OptionInfo("schedule", "constant", "how an int r is spread over blocks: constant or decreasing"),
        PROP_ATTN,
    )

    def validate(self) -> None:
        c = self.config
        check_counts(c["r"])
        check_choice(c["schedule"], "schedule", ("constant", "decreasing"))
        self.use_prop_attn()

    def build_reducers(self, depth: int) -> dict[int, TokenReducer]:
        rs = tome_schedule(self.config["r"], depth, self.config["schedule"])
        return {i: ToMeReducer(r) for i, r in enumerate(rs)}

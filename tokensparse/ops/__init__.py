"""Small pure tensor functions every method is built from: score, select, merge, gather."""
from .attention import (
    attention_matrix,
    attention_probs,
    attention_rollout,
    class_attention,
    gather_bias,
    pad_bias,
    policy_softmax,
    size_bias,
)
from .mctf import group_weights, mctf_assignment, mctf_scores, sum_tokens
from .merge import MergePlan, bipartite_soft_matching, merge_assignment, merge_tokens
from .select import (
    add_tokens_,
    fuse_tokens,
    gather_tokens,
    keep_assignment,
    route_tokens,
    scatter_tokens,
    split_topk,
    topk_indices,
    with_prefix,
)

__all__ = [
                     "MergePlan",
                     "add_tokens_",
                     "attention_matrix",
                     "attention_probs",
                     "attention_rollout",
                     "bipartite_soft_matching",
                     "class_attention",
                     "fuse_tokens",
                     "gather_bias",
                     "gather_tokens",
                     "group_weights",
                     "keep_assignment",
                     "mctf_assignment",
                     "mctf_scores",
                     "merge_assignment",
                     "merge_tokens",
                     "pad_bias",
                     "policy_softmax",
                     "route_tokens",
                     "scatter_tokens",
                     "size_bias",
                     "split_topk",
                     "sum_tokens",
                     "topk_indices",
                     "with_prefix",
]

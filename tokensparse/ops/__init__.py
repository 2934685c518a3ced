"""Small pure tensor functions every method is built from: score, select, merge, gather."""
from .attention import class_attention, size_bias
from .merge import MergePlan, bipartite_soft_matching, merge_assignment, merge_tokens
from .select import (fuse_tokens, gather_tokens, keep_assignment, route_tokens, split_topk, topk_indices,
                     with_prefix)

__all__ = [
    "class_attention", "size_bias", "MergePlan", "bipartite_soft_matching", "merge_assignment",
    "merge_tokens", "fuse_tokens", "gather_tokens", "keep_assignment", "route_tokens", "split_topk",
    "topk_indices", "with_prefix",
]

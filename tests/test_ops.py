"""Tensor primitives: hand-checkable cases and shape fuzzing."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensparse.families import AttentionExtras
from tokensparse.methods.topk import TopKReducer
from tokensparse.ops import (
    attention_by_head,
    attention_matrix,
    attention_rollout,
    bipartite_soft_matching,
    class_attention,
    energy_scores,
    energy_scores_,
    fuse_tokens,
    gather_tokens,
    keep_assignment,
    merge_assignment,
    merge_rows,
    merge_tokens,
    split_topk,
    topk_indices,
    with_prefix,
)
from tokensparse.state import TokenState


def test_bipartite_matching_hand_case():
    # 4 tokens: A = {0, 2}, B = {1, 3}. Token 2 is identical to token 3, token 0 is orthogonal to all.
    metric = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 2.0]]])
    plan = bipartite_soft_matching(metric, r=1)
    assert plan.src.tolist() == [[1]]      # A-index 1 = token 2
    assert plan.dst.tolist() == [[1]]      # B-index 1 = token 3
    assert plan.unm.tolist() == [[0]]
    x = torch.tensor([[[1.0], [2.0], [3.0], [7.0]]])
    size = torch.tensor([[[1.0], [1.0], [1.0], [3.0]]])
    merged, msize = merge_tokens(x, size, plan)
    # order [unmerged A..., B...]: token0, token1, (3*1 + 7*3) / 4
    assert merged.squeeze(-1).tolist() == [[1.0, 2.0, 6.0]]
    assert msize.squeeze(-1).tolist() == [[1.0, 1.0, 4.0]]
    assert merge_assignment(plan, 4).tolist() == [[0, 1, 2, 2]]


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(2, 40), c=st.integers(1, 8), data=st.data())
def test_merge_shapes_and_mass(b, n, c, data):
    r = data.draw(st.integers(0, n // 2))
    x = torch.randn(b, n, c)
    size = torch.randint(1, 4, (b, n, 1)).float()
    plan = bipartite_soft_matching(torch.randn(b, n, 5), r)
    merged, msize = merge_tokens(x, size, plan)
    assert merged.shape == (b, n - r, c) and msize.shape == (b, n - r, 1)
    # size-weighted sums are preserved: merging is an average
    assert torch.allclose((merged * msize).sum(1), (x * size).sum(1), atol=1e-4)
    assign = merge_assignment(plan, n)
    assert assign.min() >= 0 and assign.max() < n - r
    # each new token's size is the total size of the old tokens assigned to it
    rebuilt = torch.zeros(b, n - r).scatter_add(1, assign, size.squeeze(-1))
    assert torch.allclose(rebuilt, msize.squeeze(-1))


def test_merge_rows_hand_case():
    # tokens 1 and 3 merge into kept token 2 (listed first), token 0 stays alone
    x = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    size = torch.tensor([[[1.0], [1.0], [2.0], [1.0]]])
    out, out_size = merge_rows(x, size, torch.tensor([[2, 0]]), torch.tensor([[1, 3]]), torch.tensor([[0, 0]]))
    assert out.flatten().tolist() == [(2 * 3 + 2 + 4) / 4, 1.0]
    assert out_size.flatten().tolist() == [4.0, 1.0]


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(2, 30), c=st.integers(1, 6), data=st.data())
def test_merge_rows_is_the_size_weighted_group_average(b, n, c, data):
    r = data.draw(st.integers(0, n // 2))
    perm = torch.stack([torch.randperm(n) for _ in range(b)])
    keep, src = perm[:, r:], perm[:, :r]
    dst = torch.randint(0, n - r, (b, r))  # several may merge into one kept token
    x = torch.randn(b, n, c, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 4, (b, n, 1)).double()
    out, out_size = merge_rows(x, size, keep, src, dst)
    assign = torch.empty(b, n, dtype=torch.long)
    assign.scatter_(1, keep, torch.arange(n - r).expand(b, -1)).scatter_(1, src, dst)
    total = torch.zeros(b, n - r, 1, dtype=torch.float64).scatter_add_(1, assign.unsqueeze(-1), size)
    weighted = torch.zeros(b, n - r, c, dtype=torch.float64).scatter_add_(
        1, assign.unsqueeze(-1).expand(-1, -1, c), x * size)
    torch.testing.assert_close(out_size, total)
    torch.testing.assert_close(out, weighted / total)
    # gradients: each token receives its share size / group size of its group's gradient
    out.sum().backward()
    torch.testing.assert_close(x.grad, (size / total.gather(1, assign.unsqueeze(-1))).expand(-1, -1, c))


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(1, 30), p=st.integers(0, 3), data=st.data())
def test_topk_and_assignment(b, n, p, data):
    k = data.draw(st.integers(1, n))
    scores = torch.randn(b, n)
    idx = topk_indices(scores, k)
    assert idx.shape == (b, k) and (idx.diff(dim=1) > 0).all()
    keep, drop = split_topk(scores, k)
    assert torch.equal(keep, idx)
    assert scores.gather(1, keep).min(1).values.ge(scores.gather(1, drop).max(1).values if drop.numel() else -math.inf).all()
    full = with_prefix(keep, p)
    assign = keep_assignment(full, n + p, p)
    assert (assign >= 0).sum().item() == b * (k + p)
    assert torch.equal(assign.gather(1, full), torch.arange(k + p).expand(b, -1))


def test_class_attention_matches_full_softmax():
    q, k = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    bias = torch.randn(2, 1, 1, 7)
    full = ((q @ k.transpose(-2, -1)) * 0.5 + bias).softmax(-1)
    assert torch.allclose(class_attention(q, k, 0.5, bias), full[:, :, 0], atol=1e-6)


def test_evit_fusion_hand_case():
    # one prefix token and 4 patch tokens; class attention (head-mean) on patches 0.1, 0.4, 0.2, 0.3
    x = torch.arange(5 * 2, dtype=torch.float).view(1, 5, 2)
    attn = torch.tensor([[[0.0, 0.1, 0.4, 0.2, 0.3]]])
    state = TokenState(num_prefix=1)
    state.start(x)
    out = TopKReducer(keep_rate=0.5, tokens=None, fuse=True)(x, AttentionExtras(cls_attn=attn), state, block=0)
    # keeps patches 1 and 3 (tokens 2 and 4) in order; fuses patches 0 and 2 with raw weights 0.1, 0.2
    expected_fused = 0.1 * x[0, 1] + 0.2 * x[0, 3]
    assert torch.allclose(out[0], torch.stack([x[0, 0], x[0, 2], x[0, 4], expected_fused]))
    assert state.patch_to_token.tolist() == [[3, 1, 3, 2]]
    assert state.size.squeeze(-1).tolist() == [[1.0, 1.0, 1.0, 2.0]]


def test_gather_and_fuse_shapes():
    x = torch.randn(2, 6, 3)
    idx = torch.tensor([[0, 5], [2, 3]])
    assert torch.equal(gather_tokens(x, idx)[1, 0], x[1, 2])
    assert fuse_tokens(x, torch.ones(2, 6)).shape == (2, 1, 3)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 30), data=st.data())
def test_merge_odd_start_matches_even_start_on_shifted_sequence(n, data):
    # A starting at position 1 of a sequence is A starting at 0 of that sequence minus its head
    r = data.draw(st.integers(0, (n - 1) // 2))
    x, metric = torch.randn(1, n, 3), torch.randn(1, n, 4)
    size = torch.ones(1, n, 1)
    plan = bipartite_soft_matching(metric, r, a_start=1)
    merged, msize = merge_tokens(x, size, plan)
    assert merged.shape == (1, n - r, 3)
    assert torch.allclose((merged * msize).sum(1), x.sum(1), atol=1e-4)
    assign = merge_assignment(plan, n)
    rebuilt = torch.zeros(1, n - r).scatter_add(1, assign, size.squeeze(-1))
    assert torch.allclose(rebuilt, msize.squeeze(-1))
    # B tokens (even positions) are never merged away: each keeps its own slot
    assert len(set(assign[0, 0::2].tolist())) == len(range(0, n, 2))


def test_attention_rollout_by_hand():
    """Two blocks over two tokens: (I + A2) / 2 @ (I + A1) / 2; rows stay distributions."""
    a1 = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    a2 = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    step1 = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    step2 = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]])
    torch.testing.assert_close(attention_rollout([a1, a2]), step2 @ step1)
    torch.testing.assert_close(attention_rollout([a2]), step2)
    torch.testing.assert_close(attention_rollout([a1, a2]).sum(-1), torch.ones(1, 2))


def test_attention_matrix_matches_softmax_of_scaled_logits():
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    expected = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1).mean(1)
    torch.testing.assert_close(attention_matrix(q, k, 0.5), expected)
    cls = class_attention(q, k, 0.5).mean(1)  # its class-token row is what class_attention gives
    torch.testing.assert_close(attention_matrix(q, k, 0.5)[:, 0], cls)


def test_attention_by_head_is_the_attention_and_its_probabilities():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    bias = torch.randn(2, 1, 1, 5)  # proportional attention's shape: one bias per key, every head
    probs = ((q @ k.transpose(-2, -1)) * 0.5 + bias).softmax(-1)
    out, per_head = attention_by_head(q, k, v, 0.5, bias)
    torch.testing.assert_close(out, probs @ v)
    assert len(per_head) == 3
    torch.testing.assert_close(torch.stack(per_head, dim=1), probs)
    head_bias = torch.randn(2, 3, 5, 5)  # a bias per head
    out, per_head = attention_by_head(q, k, v, 0.5, head_bias)
    torch.testing.assert_close(out, ((q @ k.transpose(-2, -1)) * 0.5 + head_bias).softmax(-1) @ v)
    doubled, _ = attention_by_head(q, k, v, 0.5, None, dropout=lambda p: 2 * p)  # dropout acts on the probabilities
    torch.testing.assert_close(doubled, 2 * ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1) @ v)


def test_energy_is_the_mean_elu_and_the_in_place_form_overwrites_its_input():
    sim = torch.rand(2, 6, 6) * 2 - 1
    for margin, alpha in ((0.5, 1.0), (0.2, 0.7), (-0.3, 1.0)):
        expected = torch.nn.functional.elu(sim - margin, alpha=alpha).mean(-1)
        before = sim.clone()
        torch.testing.assert_close(energy_scores(sim, margin, alpha), expected)
        assert torch.equal(sim, before)  # the pure form leaves its input alone
        buffer = sim.clone()
        torch.testing.assert_close(energy_scores_(buffer, margin, alpha), expected)
        assert not torch.equal(buffer, sim)  # used as scratch

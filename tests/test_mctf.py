"""MCTF: each criterion and the bidirectional matching on hand-checkable cases, the one-step-ahead
attention against the authors' formulation (merged attention matrix), exactness, shapes, gradients.

Fidelity to the authors' code on real weights is ``benchmarks/authors_fidelity.py``
(``benchmarks/results/mctf_fidelity.txt``); real-weights accuracy is in ``test_accuracy.py``.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from PIL import Image

import tokensparse
from tokensparse import TokenSparseError
from tokensparse.families import AheadMerge, BlockHook
from tokensparse.families.vit import attend_ahead
from tokensparse.methods.mctf import MCTFReducer, default_r, mctf_schedule
from tokensparse.ops import group_weights, mctf_assignment, mctf_scores, sum_tokens
from tokensparse.state import TokenState
from tokensparse.viz import token_maps

SMALL = {"img_size": 64, "patch_size": 8, "depth": 4, "embed_dim": 48, "num_heads": 3, "num_classes": 10}


def small_vit(**kw) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", **{**SMALL, **kw}).eval()


def unit(*angles_deg: float) -> torch.Tensor:
    """Unit vectors in the plane at the given angles, as ``(1, n, 2)`` tokens."""
    a = torch.tensor(angles_deg) * torch.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=-1).unsqueeze(0)


# ----------------------------------------------------------------------------- the criteria, by hand

def test_score_is_the_product_of_the_three_criteria():
    metric = unit(0, 90, 0, 180)  # A = tokens 0, 2; B = tokens 1, 3 (no prefix)
    received = torch.tensor([[0.1, 0.2, 0.4, 0.4]])
    size = torch.tensor([[1.0, 2.0, 4.0, 1.0]]).unsqueeze(-1)
    scores, a_start = mctf_scores(metric, received, size, 0, tau_sim=1, tau_info=2, tau_size=4)
    assert a_start == 0
    inf = (1 / received) / (1 / received).max()  # 1, .5, .25, .25
    s = (1 / size.squeeze(-1)) / (1 / size.squeeze(-1)).max()  # 1, .5, .25, 1
    sim = torch.tensor([[0.5, 0.0], [0.5, 0.0]])  # (cos + 1) / 2: 0 vs 90 -> .5, 0 vs 180 -> 0
    want = torch.empty(2, 2)
    for i, ai in enumerate((0, 2)):
        for j, bj in enumerate((1, 3)):
            want[i, j] = sim[i, j] * (inf[0, ai] * inf[0, bj]) ** 0.5 * (s[0, ai] * s[0, bj]) ** 0.25
    torch.testing.assert_close(scores[0], want)


def test_similarity_decides_alone():
    # A: 0 (0 deg), 2 (60 deg); B: 1 (90 deg), 3 (10 deg): token 0 is closest to token 3
    metric = unit(0, 90, 60, 10)
    scores, a_start = mctf_scores(metric, torch.rand(1, 4), torch.rand(1, 4, 1) + 1, 0, 1, 0, 0)
    assign = mctf_assignment(scores, 1, a_start, bidirectional=False)
    # one-way: A left [2], then B [1, 3]; token 0 joins token 3
    assert assign.tolist() == [[2, 1, 0, 2]]


def test_informativeness_merges_the_least_attended_tokens_first():
    metric = torch.ones(1, 6, 4)  # every pair equally similar
    received = torch.tensor([[0.3, 0.2, 0.25, 0.05, 0.1, 0.1]])  # A: 0, 2, 4; B: 1, 3, 5
    scores, a_start = mctf_scores(metric, received, None, 0, 1, 20, 0)
    assign = mctf_assignment(scores, 1, a_start, bidirectional=False)
    # A token 4 (received .1, least of A) merges, into B token 3 (.05, least of all)
    assert assign[0, 4] == assign[0, 3]
    assert len(set(assign[0].tolist())) == 5


def test_size_merges_the_smallest_tokens_first():
    metric = torch.ones(1, 6, 4)
    size = torch.tensor([[1.0, 3.0, 2.0, 1.0, 5.0, 4.0]]).unsqueeze(-1)  # A: 0, 2, 4; B: 1, 3, 5
    scores, a_start = mctf_scores(metric, None, size, 0, 1, 0, 40)
    assign = mctf_assignment(scores, 1, a_start, bidirectional=False)
    assert assign[0, 0] == assign[0, 3]  # the two tokens of size 1


def test_bidirectional_matching_merges_both_ways_in_the_authors_order():
    # A = 0, 2, 4; B = 1, 3, 5 (no prefix). Similarities chosen so that step 1 merges A0 into B5,
    # and step 2 (B against the A left: 2, 4) merges B1 into A4.
    s = torch.tensor([[[0.1, 0.2, 0.9],    # A0 -> B5 (0.9: the best of A)
                       [0.3, 0.1, 0.2],    # A2
                       [0.8, 0.4, 0.1]]])  # A4; B1's best among A2, A4 is A4 (0.8)
    assign = mctf_assignment(s, 2, 0, sort_unmerged=False, bidirectional=True)
    # new order: A left in falling-score order without a prefix ([A4 .8, A2 .3]), then B left by falling
    # score against them ([B3 .4, B5 .2]); B1 joins A4, A0 joins B5
    assert assign.tolist() == [[3, 0, 1, 2, 0, 3]]
    assign = mctf_assignment(s, 2, 0, sort_unmerged=True, bidirectional=True)
    assert assign.tolist() == [[3, 1, 0, 2, 1, 3]]  # A left ascending: [A2, A4]
    one_way = mctf_assignment(s, 2, 0, sort_unmerged=True, bidirectional=False)
    assert one_way.tolist() == [[3, 1, 0, 2, 1, 3]]  # A0 -> B5 and A4 -> B1; A left [A2], then all of B


@pytest.mark.parametrize(("pooling", "weights"), [("attention", [0.2 * 1, 0.6 * 3]), ("size", [1, 3]),
                                                  ("mean", [1, 1])])
def test_merged_token_is_the_weighted_average_of_its_group(pooling, weights):
    state = TokenState(num_prefix=1)
    # patches 1 and 2 (positions 2 and 3: A and B) point the same way, all others 20 degrees apart
    x = 3 * unit(0, 90, 0, 0, *range(110, 270, 20))
    x[0, 2], x[0, 3] = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])
    state.start(x)
    state.size = torch.tensor([[1.0, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1, 1]]).unsqueeze(-1)
    received = torch.tensor([[0.5, 0.1, 0.2, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    red = MCTFReducer(1, 1, 0, 0, False, pooling, True)
    merge = red.merge(x, received, state, 0)
    assert merge is not None and merge.x.shape[1] == 11
    group = merge.assign[0, 2]
    assert merge.assign[0, 3] == group
    w = torch.tensor(weights, dtype=torch.float32)
    want = (w * torch.tensor([1.0, 2.0])).sum() / w.sum()
    torch.testing.assert_close(merge.x[0, group], torch.stack([want, torch.tensor(0.0)]))
    assert state.size[0, group, 0] == 4  # sizes add up
    assert torch.equal(merge.x[0, 0], x[0, 0])  # the class token stays first and alone


# ----------------------------------------------------------------------------- one-step-ahead attention

class _Fixed(BlockHook):
    """A hook merging by a fixed assignment with fixed weights."""
    merges_ahead = True

    def __init__(self, assign: torch.Tensor, w: torch.Tensor, n: int) -> None:
        super().__init__()
        self.assign, self.w, self.n = assign, w, n

    def merge_ahead(self, x, attn, state, block):
        weights = group_weights(self.w, self.assign, self.n)
        return AheadMerge(sum_tokens(x * weights, self.assign, self.n), self.assign, weights)


def test_one_step_ahead_attention_equals_the_merged_attention_matrix():
    """The authors' one-step-ahead: attention rows pooled (weighted), columns summed, applied to the
    merged tokens' values (``merge_wavg`` in their utils/mctf.py)."""
    torch.manual_seed(1)
    B, N, C, H, n = 2, 7, 8, 2, 4
    x = torch.randn(B, N, C)
    assign = torch.tensor([[0, 1, 1, 2, 3, 3, 3], [0, 2, 1, 1, 3, 2, 3]])
    w = torch.rand(B, N, 1) + 0.1
    wq, wk, wv = (torch.randn(C, C) for _ in range(3))
    norm = torch.nn.LayerNorm(C)
    bias = torch.randn(B, 1, 1, N)

    def qk(h):
        return (h @ wq).view(B, N, H, -1).transpose(1, 2), (h @ wk).view(B, N, H, -1).transpose(1, 2)

    out, merged = attend_ahead(x, norm, qk, lambda h: h @ wv, 0.5, bias, _Fixed(assign, w, n), TokenState(), 0,
                               lambda t: t)
    q, k = qk(norm(x))
    attn = ((q @ k.transpose(-1, -2)) * 0.5 + bias).softmax(-1)  # (B, H, N, N)
    member = torch.nn.functional.one_hot(assign, n).float()  # (B, N, n)
    pool = member * w / (member * w).sum(1, keepdim=True)  # (B, N, n): weights within each group
    attn_n = pool.transpose(1, 2).unsqueeze(1) @ attn @ member.unsqueeze(1)  # (B, H, n, n)
    torch.testing.assert_close(attn_n.sum(-1), torch.ones(B, H, n))  # still a distribution
    v = (norm(merged) @ wv).view(B, n, H, -1).transpose(1, 2)
    want = (attn_n @ v).transpose(1, 2).reshape(B, n, C)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, pool.transpose(1, 2) @ x)


# ----------------------------------------------------------------------------- on models

@pytest.mark.parametrize("spec", ["mctf:r=0", "mctf:r=[0,0,0,0]", "mctf:r=0,one_step_ahead=false"])
def test_merging_nothing_is_exact_and_unpatch_restores(spec):
    model = small_vit()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        tokensparse.patch(model, spec)
        assert torch.equal(model(x), ref)
        tokensparse.unpatch(model)
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("spec", ["mctf:r=8", "mctf:r=8,one_step_ahead=false", "mctf:r=8,pooling=size",
                                  "mctf:r=8,bidirectional=false,pooling=mean"])
def test_merging_identical_tokens_is_lossless(spec):
    """A flat image with no position embedding: every patch token is the same, so any merge is
    lossless with proportional attention (a merged key weighs as its members) and the pooled
    one-step-ahead rows: the logits stay the unreduced model's."""
    model = small_vit()
    with torch.no_grad():
        model.pos_embed.zero_()
        x = torch.full((2, 3, 64, 64), 0.3)
        ref = model(x)
        tokensparse.patch(model, spec)
        out = model(x)
    assert [r.num_tokens for r in tokensparse.location_records(model)] == [57, 49, 41]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ahead", [True, False])
def test_token_counts_sizes_and_records(ahead):
    model = tokensparse.patch(small_vit(dynamic_img_size=True), "mctf", r=[0, 5, 6, 7], one_step_ahead=ahead)
    for B, size in ((1, 64), (3, 64), (2, 96)):
        with torch.no_grad():
            out = model(torch.randn(B, 3, size, size))
        n0 = (size // 8) ** 2
        records = tokensparse.location_records(model)
        assert out.shape == (B, 10)
        assert [r.block for r in records] == [1, 2, 3]
        assert [r.num_tokens for r in records] == [1 + n0 - 5, 1 + n0 - 11, 1 + n0 - 18]
        for r in records:
            assert r.size.shape == (B, r.num_tokens) and (r.size[:, 0] == 1).all()
            assert (r.size.sum(1) == n0 + 1).all()
            assert r.patch_to_token.shape == (B, n0) and (r.patch_to_token >= 1).all()
            counts = torch.stack([torch.bincount(row, minlength=r.num_tokens) for row in r.patch_to_token])
            assert torch.equal(counts[:, 1:].float(), r.size[:, 1:])


def test_at_least_ten_tokens_are_left_and_half_the_patches_at_most():
    red = MCTFReducer(100, 1, 20, 40, True, "attention", True)
    assert red.count(17, 1) == 7  # 17 tokens: 10 left
    assert red.count(197, 1) == 98  # half the 196 patches
    assert red.count(9, 1) == 0


def test_default_r_and_blocks_scale_with_depth():
    assert default_r(12) == 16 and default_r(24) == 8 and default_r(4) == 59
    assert mctf_schedule(None, 12) == [0] + [16] * 11
    assert mctf_schedule(13, 4) == [0, 13, 13, 13]
    assert mctf_schedule([3, 2], 4) == [3, 2, 0, 0]
    model = tokensparse.patch(small_vit(depth=12), "mctf")
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert [r.block for r in tokensparse.location_records(model)] == list(range(1, 12))


@pytest.mark.parametrize("ahead", [True, False])
def test_train_mode_gradients(ahead):
    model = tokensparse.patch(small_vit(drop_path_rate=0.1), "mctf", r=6, one_step_ahead=ahead).train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_models_without_a_class_token_and_with_registers():
    for kw in ({"class_token": False, "global_pool": "avg"}, {"reg_tokens": 2}):
        model = small_vit(**kw)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            ref = model(x)
            tokensparse.patch(model, "mctf:r=0")
            assert torch.equal(model(x), ref)
            tokensparse.patch(model, "mctf:r=6")
            assert model(x).shape == ref.shape
        P = model.num_prefix_tokens
        assert all(r.num_prefix == P for r in tokensparse.location_records(model))


def test_token_maps_of_merged_groups(tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()).save(photo)
    fig = token_maps(small_vit(), ["mctf:r=8", "mctf:r=8,one_step_ahead=true"], photo, out=tmp_path / "maps.png")
    assert len(fig.axes) == 2 * (1 + 3)  # blocks 1-3 merge
    assert (tmp_path / "maps.png").stat().st_size > 0


def test_full_grid_intermediates():
    model = tokensparse.patch(small_vit(), "mctf:r=8")
    with torch.no_grad():
        final, inter = model.forward_intermediates(torch.randn(2, 3, 64, 64))
    assert final.shape[1] == 1 + 64 - 24 and all(t.shape == (2, 48, 8, 8) for t in inter)


@pytest.mark.parametrize(("options", "message"), [
    ({"r": -1}, "r must be"), ({"r": [1, 2, 3, 4, 5]}, "r has 5 entries"), ({"tau_sim": -1}, "tau_sim"),
    ({"tau_info": "x"}, "tau_info"), ({"pooling": "max"}, "pooling must be one of attention, size, mean"),
    ({"one_step_ahead": 1}, "one_step_ahead must be true or false"), ({"bidirectional": None}, "bidirectional"),
])
def test_bad_options_are_clear_errors(options, message):
    model = small_vit()
    with pytest.raises(TokenSparseError, match=message):
        tokensparse.patch(model, "mctf", **options)
    assert not tokensparse.is_patched(model)


def test_mctf_in_a_mix_and_listed():
    model = small_vit()
    tokensparse.patch(model, "ppt:locations=[1],r=4+mctf:r=[0,0,5,5]")
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert [r.block for r in tokensparse.location_records(model)] == [1, 2, 3]
    info = {m.name: m for m in tokensparse.list_methods()}["mctf"]
    assert {"vit", "hf-vit", "hf-dinov2", "hf-clip", "hf-siglip"} <= set(info.families)
    assert "levit" not in info.families and "convnext" not in info.families
    other = copy.deepcopy(model)
    assert tokensparse.is_patched(other)

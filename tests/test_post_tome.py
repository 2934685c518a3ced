"""ToFu, PiToMe, DiffRate and Zero-TPrune: each rule on a hand-checkable case, exactness when
nothing is removed, shapes, batch 1, records, gradients, errors.

Fidelity to the authors' code on real weights (PiToMe, DiffRate) is ``benchmarks/authors_fidelity.py``
(``benchmarks/results/{pitome,diffrate}_fidelity.txt``); compile and ONNX are in ``test_deploy.py``,
the transformers families in ``test_hf.py``.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch

import tokensparse
from tokensparse import TokenSparseError
from tokensparse.families import AttentionExtras
from tokensparse.methods.diffrate import AUTHORS_TINY_1G, DiffRateReducer, default_schedule
from tokensparse.methods.pitome import PiToMeReducer, pitome_assignment
from tokensparse.methods.tofu import ToFuReducer
from tokensparse.methods.zerotprune import default_iterations, zerotprune_keep
from tokensparse.ops import energy_scores, head_filtered_importance, mlerp_tokens, pairwise_cosine, weighted_pagerank
from tokensparse.state import TokenState

SMALL = {"img_size": 64, "patch_size": 8, "depth": 4, "embed_dim": 48, "num_heads": 3, "num_classes": 10}
NEW = ["tofu", "pitome", "diffrate", "zerotprune"]


def small_vit(**kw) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", **{**SMALL, **kw}).eval()


def unit(*angles_deg: float) -> torch.Tensor:
    """Unit vectors in the plane at the given angles, as ``(1, n, 2)`` tokens."""
    a = torch.tensor(angles_deg) * torch.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=-1).unsqueeze(0)


def started(x: torch.Tensor, num_prefix: int = 0, prop_attn: bool = True) -> TokenState:
    state = TokenState(num_prefix=num_prefix, prop_attn=prop_attn)
    state.start(x)
    return state


# ----------------------------------------------------------------------------- ToFu

def test_mlerp_keeps_the_largest_norm_and_the_average_direction():
    x = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [3.0, 4.0]]])
    size = torch.ones(1, 3, 1)
    assign = torch.tensor([[0, 0, 1]])  # tokens 0 and 1 merge; token 2 alone
    out = mlerp_tokens(x, size, assign, 2)
    avg = torch.tensor([1.0, 0.5])
    torch.testing.assert_close(out[0, 0], avg / avg.norm() * 2.0)  # direction of the mean, norm of the largest
    torch.testing.assert_close(out[0, 1], x[0, 2])  # a token alone is unchanged


def test_tofu_prunes_before_the_switch_and_merges_by_mlerp_after():
    # no prefix; A = tokens 0, 2 (0 and 100 deg), B = 1, 3 (10 and 90 deg); r = 1 -> token 0 joins token 1
    keys = unit(0, 10, 100, 90)
    x = torch.tensor([[[4.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0]]])
    extras = AttentionExtras(keys=keys)
    state = started(x)
    pruned = ToFuReducer(1, "prune")(x, extras, state, 0)
    torch.testing.assert_close(pruned, x[:, [2, 1, 3]])  # A left, then B; token 0 dropped, its partner as it was
    assert state.token_map().tolist() == [[-1, 1, 0, 2]] and state.size is None
    state = started(x)
    merged = ToFuReducer(1, "mlerp")(x, extras, state, 0)
    avg = (x[0, 0] + x[0, 1]) / 2
    torch.testing.assert_close(merged[0, 1], avg / avg.norm() * 4.0)
    torch.testing.assert_close(merged[0, [0, 2]], x[0, [2, 3]])
    assert state.size.squeeze(-1).tolist() == [[1.0, 2.0, 1.0]]


def test_tofu_blocks_switch_from_pruning_to_merging():
    model = tokensparse.patch(small_vit(), "tofu:r=2")
    modes = [b.ts_reducer.mode for b in model.blocks]
    assert modes == ["prune", "prune", "mlerp", "mlerp"]
    model = tokensparse.patch(small_vit(), "tofu:r=2,switch=1,merge=average")
    assert [b.ts_reducer.mode for b in model.blocks] == ["prune", "average", "average", "average"]


# ----------------------------------------------------------------------------- PiToMe

def test_energy_is_the_mean_elu_of_the_shifted_similarity():
    sim = torch.tensor([[[1.0, 0.2], [0.2, 1.0]]])
    e = energy_scores(sim, margin=0.5)
    want = (torch.tensor(0.5) + (math.exp(-0.3) - 1)) / 2  # elu(0.5) = 0.5, elu(-0.3) = exp(-0.3) - 1
    torch.testing.assert_close(e, torch.full((1, 2), float(want)))


CLUSTER = unit(0, 2, 4, 6, 90, 180)  # tokens 0-3 a tight cluster (high energy), 4 and 5 isolated (low energy)


def _cluster_sim() -> torch.Tensor:
    return pairwise_cosine(CLUSTER)


def test_pitome_merges_inside_the_cluster_and_protects_isolated_tokens():
    sim = _cluster_sim()
    order = energy_scores(sim, 0.5).argsort(dim=-1, descending=True)[0].tolist()
    assert set(order[:4]) == {0, 1, 2, 3}
    assign = pitome_assignment(CLUSTER, 2, margin=0.5, alpha=1.0, bsm=False)[0]
    a, b = order[:4][::2], order[:4][1::2]
    protected = order[4:]
    assert [assign[t].item() for t in protected] == [0, 1]  # protected first, by falling energy
    assert [assign[t].item() for t in b] == [2, 3]  # then set B
    for t in a:  # every A token joins its most similar B token
        best = max(b, key=lambda j: sim[0, t, j].item())
        assert assign[t].item() == 2 + b.index(best)
    assert {assign[4].item(), assign[5].item()} == {0, 1}  # the isolated tokens stay themselves


def test_pitome_bsm_alternates_by_energy_and_merges_the_best_matches():
    sim = _cluster_sim()
    order = energy_scores(sim, 0.5).argsort(dim=-1, descending=True)[0].tolist()
    assign = pitome_assignment(CLUSTER, 1, margin=0.5, alpha=1.0, bsm=True)[0]
    a, b = order[::2], order[1::2]
    best = {t: max(sim[0, t, j].item() for j in b) for t in a}
    merged = max(a, key=lambda t: best[t])
    assert sorted(assign.tolist()).count(assign[merged].item()) == 2  # it shares a token with its partner
    assert assign[merged].item() >= len(a) - 1  # ... which is in set B (after the A tokens left)
    assert len(set(assign.tolist())) == 5


def test_pitome_count_is_the_authors_floor_and_the_margin_falls_with_depth():
    assert PiToMeReducer(None, 0.9, 0.75, 1.0, True).count(196) == math.floor(196 - 196 * 0.9) == 19
    assert PiToMeReducer(None, 1.0, 0.75, 1.0, True).count(196) == 0
    assert PiToMeReducer(40, 0.9, 0.75, 1.0, True).count(50) == 25  # at most half
    model = tokensparse.patch(small_vit(), "pitome")
    hooks = [b.ts_reducer for b in model.blocks]
    assert [h.margin for h in hooks] == pytest.approx([0.75 * (1 - i / 4) for i in range(4)])
    assert [h.bsm for h in hooks] == [True, True, False, False]


# ----------------------------------------------------------------------------- DiffRate

def test_diffrate_prunes_by_class_attention_then_merges_the_least_important():
    # prefix: 1 class token; patches 1..5. Class attention ranks patches 3 > 1 > 5 > 2 > 4.
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [5.0, 5.0], [1.0, -0.05]]])
    cls = torch.tensor([[0.0, 0.3, 0.1, 0.4, 0.05, 0.15]]).unsqueeze(1)  # (B, H=1, N)
    state = started(x, num_prefix=1)
    out = DiffRateReducer(prune_kept=3, merge_kept=2)(x, AttentionExtras(cls_attn=cls), state, 0)
    # prune to patches 3, 1, 5 (token 2 and 4 dropped); then 5 (the third) joins its most similar of 3, 1
    sim = pairwise_cosine(x[:, [5]], x[:, [3, 1]])[0, 0]
    assert sim.argmax().item() == 1  # patch 5 (1, -.05) is closest to patch 1 (1, 0)
    want = torch.stack([x[0, 0], x[0, 3], (x[0, 1] + x[0, 5]) / 2])  # the plain mean
    torch.testing.assert_close(out[0], want)
    torch.testing.assert_close(state.size[0, :, 0], torch.stack([torch.tensor(1.0), torch.tensor(1.0),
                                                                  1 + sim.max()]))
    assert state.token_map().tolist() == [[2, -1, 1, -1, 2]]


def test_diffrate_default_is_the_authors_tiny_schedule():
    prune, merge = default_schedule(12, 196)
    assert prune == [c - 1 for c in AUTHORS_TINY_1G[0]] and merge == [c - 1 for c in AUTHORS_TINY_1G[1]]
    prune, merge = default_schedule(4, 64)
    assert len(prune) == 4 and all(1 <= k <= 64 for k in prune + merge)


def test_diffrate_needs_a_class_token():
    model = timm.create_model("vit_tiny_patch16_224", **SMALL, class_token=False, global_pool="avg")
    with pytest.raises(TokenSparseError, match="class token"):
        tokensparse.patch(model, "diffrate")


# ----------------------------------------------------------------------------- Zero-TPrune

def test_weighted_pagerank_on_a_three_token_graph():
    # everyone attends to token 2 but token 2 attends to token 0
    a = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]).view(1, 1, 3, 3)
    s1 = weighted_pagerank(a, 1)
    torch.testing.assert_close(s1[0, 0], torch.tensor([1 / 3, 0.0, 2 / 3]))
    s2 = weighted_pagerank(a, 2)  # token 2's importance flows to token 0
    torch.testing.assert_close(s2[0, 0], torch.tensor([2 / 3, 0.0, 1 / 3]))


def test_head_filter_leaves_out_flat_heads_and_aggregates_by_root_mean_square():
    flat = torch.full((4,), 0.25)
    peaked = torch.tensor([0.7, 0.1, 0.1, 0.1])
    other = torch.tensor([0.1, 0.5, 0.3, 0.1])
    scores = torch.stack([flat, peaked, other]).unsqueeze(0)
    imp = head_filtered_importance(scores, 0.01, 10.0)
    torch.testing.assert_close(imp[0], ((peaked ** 2 + other ** 2) / 2).sqrt())  # the flat head (variance 0) is out
    none_pass = head_filtered_importance(flat.view(1, 1, 4), 0.01, 10.0)
    torch.testing.assert_close(none_pass[0], flat)  # no head passes: every head counts


def test_zerotprune_prunes_the_less_important_tokens_most_similar_to_important_ones():
    importance = torch.tensor([[0.9, 0.8, 0.1, 0.2]])  # important: 0, 1; less: 3, 2
    keys = unit(0, 90, 5, 45)  # token 2 is nearly token 0; token 3 halfway
    keep = zerotprune_keep(importance, keys, 1)
    assert keep.tolist() == [[0, 1, 3]]  # token 2 pruned; kept by falling importance


def test_zerotprune_iterations_follow_the_paper():
    assert default_iterations(12) == [30, 30, 30, 5, 5, 5, 5, 5, 5, 1, 1, 1]


# ----------------------------------------------------------------------------- every new method

@pytest.mark.parametrize("spec", ["tofu:r=0", "pitome:ratio=1.0", "pitome:r=0", "zerotprune:r=0",
                                  "diffrate:prune_kept=[64,64],merge_kept=[64,64]"])
def test_removing_nothing_is_exact(spec):
    model = small_vit()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = tokensparse.patch(model, spec)(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["tofu:r=8", "pitome:r=8", "diffrate", "zerotprune:r=8"])
def test_shapes_batch_one_and_records(spec):
    model = tokensparse.patch(small_vit(), spec)
    for B in (1, 3):
        with torch.no_grad():
            out = model(torch.randn(B, 3, 64, 64))
        assert out.shape == (B, 10)
        records = tokensparse.location_records(model)
        assert records and records[-1].num_tokens < 65
        tokens = [r.num_tokens for r in records]
        assert tokens == sorted(tokens, reverse=True)
    inter = model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
    assert all(t.shape[-2:] == (8, 8) for t in inter)  # full-grid intermediates


@pytest.mark.parametrize("spec", ["tofu:r=8", "pitome:r=8", "diffrate", "zerotprune:r=8"])
def test_train_mode_gradients(spec):
    model = tokensparse.patch(small_vit(), spec).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert model.head.weight.grad is not None and model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_methods_without_a_class_token_run_on_avg_pool_models():
    for spec in ("tofu:r=8", "pitome:r=8", "zerotprune:r=8"):
        model = tokensparse.patch(timm.create_model("vit_tiny_patch16_224", **SMALL, class_token=False,
                                                    global_pool="avg").eval(), spec)
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize(("spec", "message"), [
    ("tofu:merge=sum", "merge must be one of"), ("tofu:switch=9", "switch must be a block index"),
    ("pitome:ratio=0.3", "ratio must be a number in"), ("pitome:alpha=0", "alpha must be a number > 0"),
    ("diffrate:prune_kept=[10]", "together"), ("diffrate:prune_kept=[1,2,3,4,5],merge_kept=[1]", "5 entries"),
    ("zerotprune:var_min=1,var_max=0.5", "must not be below"), ("zerotprune:iterations=[1,2]", "2 entries"),
])
def test_bad_options_are_clear_errors(spec, message):
    with pytest.raises(TokenSparseError, match=message):
        tokensparse.patch(small_vit(), spec)


def test_listed_with_their_families():
    infos = {i.name: i for i in tokensparse.list_methods()}
    for name in NEW:
        assert "vit" in infos[name].families and "hf-vit" in infos[name].families
    assert "hf-siglip" not in infos["diffrate"].families and "hf-siglip" in infos["zerotprune"].families


# ----------------------------------------------------------------------------- DiffRate's learned rates

def test_rate_choice_rounds_up_the_expected_count_and_its_mask_carries_the_gradient():
    from tokensparse.methods.diffrate import RateChoice

    rate = RateChoice(8, granularity=2)  # candidates 8, 6, 4, 2, uniform: expected 5
    assert rate.candidates.tolist() == [8.0, 6.0, 4.0, 2.0]
    kept = rate.kept()
    assert kept.item() == 5.0
    kept.backward()
    torch.testing.assert_close(rate.logits.grad, rate.candidates * 0.25 - 5 * 0.25)  # d E / d logits
    mask = rate.mask(5, 8, 8)
    assert mask.detach().tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    rate.logits.grad = None
    mask[6].backward()  # rank 6 is kept by the candidate 8 alone: its probability's gradient
    assert rate.logits.grad[0] > 0 and (rate.logits.grad[1:] < 0).all()


def test_ste_min_and_the_gmacs_model():
    from tokensparse.train.diffrate import GMACsModel, ste_min

    n, a, b = torch.tensor(10.0), torch.tensor(7.0, requires_grad=True), torch.tensor(9.0, requires_grad=True)
    out = ste_min(n, a, b)
    out.backward()
    assert out.item() == 7.0 and a.grad.item() == 1.0 and b.grad.item() == 1.0
    cost = GMACsModel(1.0, depth=2, tokens=5, dim=4, hidden=16)
    assert cost.of([None, None], 1).item() == pytest.approx(1.0)
    fewer = cost.of([None, (torch.tensor(1.0), torch.tensor(1.0))], 1)  # block 1's MLP on 2 tokens
    assert fewer.item() == pytest.approx(1.0 - (cost.mlp(5.0) - cost.mlp(2.0)) / 1e9)


def test_calibrate_diffrate_learns_counts_toward_the_target(tmp_path, capsys):
    from tokensparse.cli import main
    from tokensparse.measure import gmacs

    root = tmp_path / "photos"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    from PIL import Image
    for i in range(6):
        Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / f"{i}.png")
    full = gmacs(timm.create_model("test_vit"))
    target = round(0.8 * full, 4)
    rc = main(["calibrate", "--model", "test_vit", "--images", str(root), "--method", "diffrate", "--gmacs",
               str(target), "--epochs", "2", "--batch-size", "3", "--out", str(tmp_path / "spec.txt")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    spec = (tmp_path / "spec.txt").read_text().strip()
    assert spec.startswith("diffrate:prune_kept=[") and spec in out.out
    model = tokensparse.patch(timm.create_model("test_vit").eval(), spec)
    assert gmacs(model) < full  # it learned to remove tokens
    assert model(torch.randn(1, 3, 160, 160)).shape == (1, 1000)
    assert main(["calibrate", "--model", "test_vit", "--images", str(root), "--method", "diffrate"]) == 2
    assert "--gmacs" in capsys.readouterr().err
    assert main(["calibrate", "--model", "test_vit", "--images", str(root), "--method", "diffrate", "--gmacs",
                 str(2 * full)]) == 2
    assert "not below the unreduced" in capsys.readouterr().err

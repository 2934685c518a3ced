"""PPT: exactness at r=0, the pool/prune decision, mixed batches, training, options, real accuracy."""
from __future__ import annotations

import pytest
import timm
import torch

import tokensparse
from tokensparse import TokenSparseError
from tokensparse.families import AttentionExtras
from tokensparse.methods.ppt import PPTReducer, choose_pool, default_r, ppt_scores
from tokensparse.methods.tome import merge_patch_tokens
from tokensparse.state import TokenState


def _model(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kw).eval()


def _run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[tokensparse.LocationInfo]]:
    with torch.no_grad():
        out = model(x)
    return out, tokensparse.info(model)


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_r0_is_exact(name):
    model = _model(name)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
    tokensparse.patch(model, "ppt:r=0")
    out, info = _run(model, x)
    assert (out - ref).abs().max().item() <= 1e-5
    assert [l.num_tokens for l in info] == [model.num_prefix_tokens + 196] * 3


# ----------------------------------------------------------------------------- the decision

def test_scores_hand_case():
    # 1 prefix token, 4 patches, 2 heads: head sum [., .4, .4, .6, .4] times value norm [., 1, 2, 1, .5]
    cls_attn = torch.tensor([[[0.2, 0.1, 0.3, 0.2, 0.2], [0.0, 0.3, 0.1, 0.4, 0.2]]])
    value_norm = torch.tensor([[9.0, 1.0, 2.0, 1.0, 0.5]])
    scores = ppt_scores(cls_attn, value_norm, num_prefix=1)
    assert torch.allclose(scores, torch.tensor([[0.2, 0.4, 0.3, 0.1]]))


def test_flat_scores_pool_and_peaked_scores_prune():
    n = 196
    flat = torch.full((1, n), 1.0 / n)
    peaked = torch.full((1, n), 0.1 / (n - 1))
    peaked[0, 7] = 0.9
    pooled, variance = choose_pool(torch.cat([flat, peaked]), threshold=7e-5)
    assert pooled.tolist() == [True, False]
    assert variance[0] < 1e-12 and variance[1] > 7e-5
    assert torch.allclose(variance, torch.cat([flat, peaked]).var(dim=-1))


def _hand_batch():
    """2 images, 1 prefix + 8 patch tokens: image 0 has flat attention, image 1 peaked."""
    torch.manual_seed(1)
    B, n, C = 2, 8, 4
    x = torch.randn(B, 1 + n, C)
    keys = torch.randn(B, 1 + n, 3)
    cls_attn = torch.full((B, 2, 1 + n), 1.0 / (1 + n))
    cls_attn[1, :, 1:] = torch.tensor([0.05, 0.3, 0.01, 0.2, 0.02, 0.15, 0.04, 0.1])
    value_norm = torch.ones(B, 1 + n)
    return x, AttentionExtras(cls_attn=cls_attn, keys=keys, value_norm=value_norm)


def _reduce(x: torch.Tensor, extras: AttentionExtras, r: int, threshold: float) -> tuple[torch.Tensor, TokenState]:
    state = TokenState(num_prefix=1, prop_attn=True)
    state.start(x)
    return PPTReducer(r=r, threshold=threshold)(x, extras, state, block=0), state


def _image(extras: AttentionExtras, i: int) -> AttentionExtras:
    return AttentionExtras(cls_attn=extras.cls_attn[i:i + 1], keys=extras.keys[i:i + 1],
                           value_norm=extras.value_norm[i:i + 1])


def test_reducer_mixed_batch_hand_case():
    x, extras = _hand_batch()
    r = 3
    out, state = _reduce(x, extras, r, threshold=1e-3)
    assert out.shape == (2, 1 + 8 - r, 4)
    assert state.locations[0].extra["pooled"].tolist() == [True, False]
    # each image equals running it alone
    for i in range(2):
        alone, s = _reduce(x[i:i + 1], _image(extras, i), r, threshold=1e-3)
        assert torch.allclose(out[i:i + 1], alone, atol=1e-6)
        assert torch.equal(state.patch_to_token[i:i + 1], s.patch_to_token)
        assert torch.equal(state.size[i:i + 1], s.sizes(alone))
    # image 0 (flat) equals ToMe merging of r tokens
    ref = TokenState(num_prefix=1)
    ref.start(x[:1])
    merged = merge_patch_tokens(x[:1], extras.keys[:1], r, ref)
    assert torch.allclose(out[:1], merged, atol=1e-6)
    assert torch.equal(state.patch_to_token[:1], ref.patch_to_token)
    assert torch.equal(state.size[:1], ref.size)
    # image 1 (peaked) lost exactly its r lowest-scoring patches (2, 4, 6), in order
    assert torch.equal(out[1], x[1, [0, 1, 2, 4, 6, 8]])
    assert state.patch_to_token[1].tolist() == [1, 2, -1, 3, -1, 4, -1, 5]
    assert state.size[1].squeeze(-1).tolist() == [1.0] * 6


@pytest.mark.parametrize("threshold, pooled", [(0.0, [False, False]), (1.0, [True, True])])
def test_reducer_uniform_batches(threshold, pooled):
    x, extras = _hand_batch()
    out, state = _reduce(x, extras, 3, threshold)
    assert state.locations[0].extra["pooled"].tolist() == pooled
    for i in range(2):
        alone, _ = _reduce(x[i:i + 1], _image(extras, i), 3, threshold)
        assert torch.allclose(out[i:i + 1], alone, atol=1e-6)


# ----------------------------------------------------------------------------- through a model

@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_mixed_batch_matches_images_alone(name):
    model = _model(name)
    torch.manual_seed(2)
    x = torch.randn(2, 3, 224, 224)
    x[1] = x[1] * 0.2 + torch.linspace(-2, 2, 224)  # a different image: different score variance
    tokensparse.patch(model, "ppt")
    _, info = _run(model, x)
    v0, v1 = info[0].extra["variance"].tolist()
    assert abs(v0 - v1) > 0.2 * max(v0, v1)
    threshold = (v0 * v1) ** 0.5  # between the two: one image pools at the first location, one prunes
    tokensparse.patch(model, "ppt", threshold=threshold)
    out, info = _run(model, x)
    assert sorted(info[0].extra["pooled"].tolist()) == [False, True]
    for i in range(2):
        alone, info_alone = _run(model, x[i:i + 1])
        assert (out[i:i + 1] - alone).abs().max().item() <= 1e-5
        for loc, loc_alone in zip(info, info_alone):
            assert loc.extra["pooled"][i:i + 1].tolist() == loc_alone.extra["pooled"].tolist()
            assert torch.equal(loc.patch_to_token[i:i + 1], loc_alone.patch_to_token)
            assert torch.allclose(loc.size[i:i + 1], loc_alone.size)


def test_info_records_choice_and_token_counts():
    model = _model("deit_tiny_distilled_patch16_224")  # two prefix tokens
    tokensparse.patch(model, "ppt")
    _, info = _run(model, torch.randn(3, 3, 224, 224))
    assert [l.block for l in info] == [3, 6, 9]
    assert [l.num_tokens for l in info] == [2 + 146, 2 + 96, 2 + 48]
    for l in info:
        assert l.extra["pooled"].dtype == torch.bool and l.extra["pooled"].shape == (3,)
        assert l.extra["variance"].shape == (3,)
        # sizes count the original patches each token holds; dropped patches map to -1
        assert torch.equal(l.size[:, 2:], l.source.sum(dim=-1)[:, 2:].float())
        assert torch.equal(l.size[:, 2:].sum(dim=1), l.kept.sum(dim=1).float())


@pytest.mark.parametrize("threshold, pooled_last", [(0.0, [False, False]), (1.0, [True, True]), (7e-5, [True, False])])
def test_train_mode_gradients(threshold, pooled_last):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=6, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 224, 224)
    x[1] = x[1] * 0.2 + torch.linspace(-2, 2, 224)  # at 7e-5 image 0 pools and image 1 prunes at block 4
    tokensparse.patch(model, "ppt", threshold=threshold)
    model(x).logsumexp(-1).mean().backward()
    info = tokensparse.info(model)
    assert [l.num_tokens for l in info] == [147, 97, 49]
    assert info[-1].extra["pooled"].tolist() == pooled_last
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------- options

def test_default_r_scales_with_resolution():
    assert default_r(196) == 50 and default_r(100) == 26 and default_r(576) == 147
    model = _model("vit_tiny_patch16_224", img_size=160)  # 100 patches -> r = 26, then capped at 24
    tokensparse.patch(model, "ppt")
    out, info = _run(model, torch.randn(1, 3, 160, 160))
    assert out.shape == (1, 1000)
    assert [l.num_tokens for l in info] == [1 + 74, 1 + 48, 1 + 24]


def test_r_list_and_locations():
    model = _model("vit_tiny_patch16_224")
    tokensparse.patch(model, "ppt:r=[10,20,30]")
    _, info = _run(model, torch.randn(1, 3, 224, 224))
    assert [l.num_tokens for l in info] == [187, 167, 137]
    tokensparse.patch(model, "ppt:r=40,locations=[0,11]")
    _, info = _run(model, torch.randn(1, 3, 224, 224))
    assert [(l.block, l.num_tokens) for l in info] == [(0, 157), (11, 117)]


def test_listed_with_defaults():
    listing = {m.name: m for m in tokensparse.list_methods()}
    assert "ppt" in listing and listing["ppt"].summary
    defaults = {o.name: o.default for o in listing["ppt"].options}
    assert defaults == {"r": None, "locations": None, "threshold": 7e-5, "prop_attn": True}
    assert listing["ppt"].supports(_model("vit_tiny_patch16_224"))


@pytest.mark.parametrize("spec, message", [
    ("ppt:r=-1", "r must be an integer >= 0, got -1"),
    ("ppt:r=[10,-2,10]", "r must be an integer >= 0, got -2"),
    ("ppt:r=[10,10]", "r has 2 entries but there are 3 locations"),
    ("ppt:threshold=-1e-5", "threshold must be a number >= 0, got -1e-05"),
    ("ppt:threshold=abc", "threshold must be a number >= 0, got 'abc'"),
    ("ppt:prop_attn=2", "prop_attn must be true or false, got 2"),
    ("ppt:locations=[3,12]", "location 12 is outside the model's blocks"),
])
def test_bad_options(spec, message):
    model = _model("vit_tiny_patch16_224")
    with pytest.raises(TokenSparseError) as e:
        tokensparse.patch(model, spec)
    assert message in str(e.value)
    assert not tokensparse.is_patched(model)


def test_needs_class_token():
    model = timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg")
    with pytest.raises(TokenSparseError, match="no class token"):
        tokensparse.patch(model, "ppt")


# ----------------------------------------------------------------------------- real accuracy

def test_real_accuracy_close_to_unreduced(vit_tiny_real):
    assert len(vit_tiny_real.labels) == 500
    assert vit_tiny_real.top1("ppt") >= vit_tiny_real.top1("none") - 1.5

"""The patch API on timm ViTs: exactness, unpatch, info records, errors, training."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import tokensparse
from tokensparse import TokenSparseError

EXACT_SPECS = ["topk:keep_rate=1.0", "evit:keep_rate=1.0", "tome:r=0"]


def _model(name: str, **kw) -> torch.nn.Module:
    return timm.create_model(name, **kw).eval()


MODELS = {
    "deit_small": lambda: _model("deit_small_patch16_224"),
    "vit_tiny": lambda: _model("vit_tiny_patch16_224"),
    "deit_tiny_distilled": lambda: _model("deit_tiny_distilled_patch16_224"),
    "vit_tiny_reg4": lambda: _model("vit_tiny_patch16_224", reg_tokens=4),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_ref(request):
    torch.manual_seed(0)
    model = MODELS[request.param]()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


@pytest.mark.parametrize("spec", EXACT_SPECS)
def test_no_reduction_is_exact(model_and_ref, spec):
    model, x, ref = model_and_ref
    tokensparse.patch(model, spec)
    try:
        with torch.no_grad():
            out = model(x)
        assert (out - ref).abs().max().item() <= 1e-5
    finally:
        tokensparse.unpatch(model)


@pytest.mark.parametrize("spec", ["tome:r=13", "evit", "topk:keep_rate=0.5"])
def test_unpatch_restores_exactly(model_and_ref, spec):
    model, x, ref = model_and_ref
    classes = [type(m) for m in model.modules()]
    tokensparse.patch(model, spec)
    with torch.no_grad():
        reduced = model(x)
    assert (reduced - ref).abs().max().item() > 0  # it really reduced something
    tokensparse.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    assert not tokensparse.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_token_counts_and_prefix_kept():
    model = _model("deit_tiny_distilled_patch16_224")  # two prefix tokens
    tokensparse.patch(model, "evit:keep_rate=0.7")
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    info = tokensparse.info(model)
    assert [l.block for l in info] == [3, 6, 9]
    # 196 patches -> ceil(0.7*196)=138 kept + 1 fused; then ceil(0.7*139)=98 + 1; ceil(0.7*99)=70 + 1
    assert [l.num_tokens for l in info] == [2 + 139, 2 + 99, 2 + 71]
    for l in info:
        assert l.num_prefix == 2
        # every original patch is held by exactly one non-prefix token (fusion keeps them all)
        assert (l.patch_to_token >= 2).all()
        assert l.source.sum(dim=1).eq(1).all()
        assert torch.allclose(l.size, l.source.sum(dim=-1).float() + (torch.arange(l.num_tokens) < 2).float())


def test_topk_source_matches_kept_patches():
    model = _model("vit_tiny_patch16_224")
    tokensparse.patch(model, "topk:tokens=[100,50,20]")
    with torch.no_grad():
        model(torch.randn(3, 3, 224, 224))
    info = tokensparse.info(model)
    assert [l.num_tokens for l in info] == [101, 51, 21]
    prev = torch.ones(3, 196, dtype=torch.bool)
    for l in info:
        kept = l.kept
        assert kept.sum(dim=1).tolist() == [l.num_tokens - 1] * 3
        assert not (kept & ~prev).any()  # a dropped patch never comes back
        prev = kept


def test_tome_sizes_sum_to_patch_count():
    model = _model("vit_tiny_patch16_224")
    tokensparse.patch(model, "tome:r=8")
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    info = tokensparse.info(model)
    assert len(info) == 12
    assert [l.num_tokens for l in info] == [197 - 8 * (i + 1) for i in range(12)]
    for l in info:
        assert torch.allclose(l.size[:, 1:].sum(dim=1), torch.full((2,), 196.0))
        assert torch.equal(l.size[:, 1:], l.source.sum(dim=-1)[:, 1:].float())


def test_default_locations_scale_with_depth():
    for depth, expected in [(12, [3, 6, 9]), (24, [6, 12, 18]), (4, [1, 2, 3])]:
        model = timm.create_model("vit_tiny_patch16_224", depth=depth).eval()
        tokensparse.patch(model, "topk")
        with torch.no_grad():
            model(torch.randn(1, 3, 224, 224))
        assert [l.block for l in tokensparse.info(model)] == expected


def test_other_input_size_and_batch_one():
    model = timm.create_model("vit_tiny_patch16_224", img_size=160).eval()
    tokensparse.patch(model, "tome:r=[10,10,10]")
    with torch.no_grad():
        out = model(torch.randn(1, 3, 160, 160))
    assert out.shape == (1, 1000)
    assert [l.num_tokens for l in tokensparse.info(model)][:4] == [91, 81, 71, 71]


def test_dynamic_img_size():
    model = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True).eval()
    tokensparse.patch(model, "evit")
    with torch.no_grad():
        model(torch.randn(2, 3, 128, 192))
    assert tokensparse.info(model)[0].patch_to_token.shape == (2, 8 * 12)


def test_avg_pool_no_class_token_tome_exact_and_weighted():
    model = timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        tokensparse.patch(model, "tome:r=0")
        assert (model(x) - ref).abs().max() <= 1e-5
        tokensparse.patch(model, "tome:r=16")
        assert model(x).shape == ref.shape
    with pytest.raises(TokenSparseError, match="no class token"):
        tokensparse.patch(model, "evit")


@pytest.mark.parametrize("spec", ["tome:r=8", "evit", "topk:keep_rate=0.5"])
def test_train_mode_gradients(spec):
    model = timm.create_model("vit_tiny_patch16_224", depth=6, drop_path_rate=0.1).train()
    tokensparse.patch(model, spec)
    loss = model(torch.randn(2, 3, 224, 224)).logsumexp(-1).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_patch_replaces_previous_method_and_options_override_spec():
    model = _model("vit_tiny_patch16_224")
    tokensparse.patch(model, "tome:r=4")
    tokensparse.patch(model, "topk:keep_rate=0.9", keep_rate=0.5)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    info = tokensparse.info(model)
    assert [l.num_tokens for l in info] == [99, 50, 26]
    assert sum(isinstance(m, torch.nn.Module) and type(m).__name__.startswith("ToMe") for m in model.modules()) == 0


def test_methods_listing():
    listing = {m.name: m for m in tokensparse.list_methods()}
    assert {"topk", "evit", "tome"} <= set(listing)
    evit = {o.name: o.default for o in listing["evit"].options}
    assert evit["keep_rate"] == 0.7 and evit["fuse"] is True
    assert {o.name: o.default for o in listing["tome"].options}["r"] == 13
    assert all(m.summary for m in listing.values())
    vit = _model("vit_tiny_patch16_224")
    assert listing["tome"].supports(vit)
    assert not listing["tome"].supports(timm.create_model("resnet18"))


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown method 'nope'; valid methods: topk, evit, tome"),
    ("tome:k=3", "unknown option(s) 'k' for method 'tome'; valid options"),
    ("evit:keep_rate=0", "keep_rate must be a number in (0, 1], got 0"),
    ("topk:keep_rate=1.5", "keep_rate must be a number in (0, 1], got 1.5"),
    ("tome:r=-1", "r must be an integer >= 0, got -1"),
    ("evit:locations=[3,12]", "location 12 is outside the model's blocks: valid block indices are 0..11"),
    ("topk:keep_rate=[0.5,0.5]", "keep_rate has 2 entries but there are 3 locations"),
    ("tome:r=3,", None),
    ("tome:r", "bad option 'r'"),
])
def test_bad_input_errors(spec, message):
    model = _model("vit_tiny_patch16_224")
    if message is None:
        tokensparse.patch(model, spec)
        return
    with pytest.raises(TokenSparseError) as e:
        tokensparse.patch(model, spec)
    assert message in str(e.value)
    assert not tokensparse.is_patched(model)


def test_unsupported_family_names_supported():
    with pytest.raises(TokenSparseError, match="model family not supported: ResNet. Supported: vit"):
        tokensparse.patch(timm.create_model("resnet18"), "tome")


def test_spec_parsing():
    assert tokensparse.parse_spec("tome:r=[1,2, 3],prop_attn=false,schedule=decreasing") == (
        "tome", {"r": [1, 2, 3], "prop_attn": False, "schedule": "decreasing"})
    assert tokensparse.parse_spec("EViT:keep_rate=0.5") == ("evit", {"keep_rate": 0.5})
    assert tokensparse.format_spec("tome", {"r": [1, 2], "prop_attn": True}) == "tome:r=[1,2],prop_attn=true"


def test_deepcopy_of_patched_model_is_independent():
    model = _model("vit_tiny_patch16_224")
    tokensparse.patch(model, "tome:r=8")
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
    tokensparse.unpatch(twin)
    assert tokensparse.is_patched(model)


# ----------------------------------------------------------------------------- dense features

def _tiny(depth: int = 4, img: int = 64, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return _model("vit_tiny_patch16_224", depth=depth, img_size=img, **kw)


@pytest.mark.parametrize("spec", ["topk:keep_rate=1.0", "tome:r=0", "evovit:keep_rate=1.0", "ppt:r=0"])
def test_intermediates_with_nothing_reduced_equal_timms(spec):
    model = _tiny(reg_tokens=2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref_final, ref = model.forward_intermediates(x, norm=True)
        ref_prefix = model.forward_intermediates(x, indices=2, return_prefix_tokens=True, intermediates_only=True)
        tokensparse.patch(model, spec)
        final, out = model.forward_intermediates(x, norm=True)
        prefix = model.forward_intermediates(x, indices=2, return_prefix_tokens=True, intermediates_only=True)
    assert (final - ref_final).abs().max().item() <= 1e-5
    assert len(out) == len(ref) == 4 and all((a - b).abs().max().item() <= 1e-5 for a, b in zip(out, ref))
    assert all((a - b).abs().max().item() <= 1e-5 for p, q in zip(prefix, ref_prefix) for a, b in zip(p, q))


@pytest.mark.parametrize("spec, img, grid", [("topk:keep_rate=0.5,locations=[10]", 224, 14), ("tome:r=4", 64, 4),
                                             ("ppt", 224, 14), ("evit", 224, 14), ("evovit", 224, 14),
                                             ("dynamicvit", 224, 14)])
def test_intermediates_of_a_reduced_model_cover_the_full_grid(spec, img, grid):
    model = tokensparse.patch(_tiny(depth=12, img=img), spec)
    with torch.no_grad():
        out = model.forward_intermediates(torch.randn(2, 3, img, img), intermediates_only=True)
        nlc = model.forward_intermediates(torch.randn(1, 3, img, img), indices=[0, 11], output_fmt="NLC",
                                          intermediates_only=True)
    assert [tuple(t.shape) for t in out] == [(2, 192, grid, grid)] * 12
    assert [tuple(t.shape) for t in nlc] == [(1, grid * grid, 192)] * 2


def test_intermediates_keep_dropped_patches_and_broadcast_merged_ones():
    """A patch dropped at block 1 keeps its block-0 feature; patches merged into one token share its feature."""
    model = tokensparse.patch(_tiny(), "topk:keep_rate=0.5,locations=[1]")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    dropped = ~tokensparse.location_records(model)[0].kept
    assert 0 < int(dropped.sum()) < dropped.numel()
    for later in out[1:]:
        assert torch.equal(later[dropped], out[0][dropped])
    assert not torch.equal(out[1][~dropped], out[0][~dropped])
    tokensparse.patch(model, "tome:r=8")
    with torch.no_grad():
        _, out = model.forward_intermediates(x, output_fmt="NLC")
    p2t = tokensparse.location_records(model)[-1].patch_to_token
    for b in range(2):
        for token in p2t[b].unique():
            group = out[-1][b][p2t[b] == token]
            assert torch.equal(group, group[:1].expand_as(group))
    assert len(p2t[0].unique()) < p2t.shape[1]  # some patches really were merged


# ----------------------------------------------------------------------------- a failed patch changes nothing

@pytest.mark.parametrize("bad", ["topk:locations=[99]", "dynamicvit:predictors=/nonexistent.safetensors",
                                 "evovit:stages=[1,9]", "ppt:r=[1,2]"])
def test_failed_patch_keeps_the_previous_method(bad):
    model = tokensparse.patch(_tiny(), "tome:r=3")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(TokenSparseError):
        tokensparse.patch(model, bad)
    assert tokensparse.patched_method(model).name == "tome"
    with torch.no_grad():
        assert torch.equal(model(x), before)

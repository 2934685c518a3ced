"""Mix: block-reducing methods joined by '+', each at its own blocks (specs, exactness, placement, errors)."""
from __future__ import annotations

import pytest
import timm
import torch

import tokensparse
from tokensparse import TokenSparseError
from tokensparse.cli import main
from tokensparse.spec import format_spec, parse_spec, split_parts

SMALL = {"img_size": 64, "patch_size": 8, "depth": 6, "embed_dim": 64, "num_heads": 2, "num_classes": 10}


def small_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **SMALL).eval()


def run(model: torch.nn.Module, spec: str, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    tokensparse.patch(model, spec)
    with torch.no_grad():
        out = model(x)
    return out, [(loc.block, loc.num_tokens) for loc in tokensparse.location_records(model)]


def test_parts_parse_and_format_back():
    spec = "ppt:locations=[3,6],r=50+tome:r=[0,0,0,0,0,0,0,12]+topk:locations=[11],tokens=[1]"
    name, options = parse_spec(spec)
    assert name == "mix" and options == {"parts": ["ppt:locations=[3,6],r=50", "tome:r=[0,0,0,0,0,0,0,12]",
                                                   "topk:locations=[11],tokens=[1]"]}
    assert format_spec(name, options) == spec
    assert split_parts("ppt:threshold=1e+5") == ["ppt:threshold=1e+5"]  # an exponent is not a part
    assert parse_spec("ppt:threshold=1e+5") == ("ppt", {"threshold": 1e5})
    assert parse_spec('dynamicvit:predictors="a+b.safetensors"')[0] == "dynamicvit"  # nor a quoted '+'
    assert parse_spec(" tome:r=2 + ppt:locations=[3] ") == ("mix", {"parts": ["tome:r=2", "ppt:locations=[3]"]})


def test_one_method_split_into_parts_reproduces_it():
    """A mix only places its parts: a schedule split over two parts is the same model."""
    x = torch.randn(2, 3, 64, 64)
    for whole, split in (("tome:r=[4,0,6,5]", "tome:r=[4]+tome:r=[0,0,6,5]"),
                         ("topk:locations=[1,3],tokens=[40,20]", "topk:locations=[1],tokens=[40]+topk:locations=[3],keep_rate=0.5"),
                         ("ppt:locations=[1,4],r=[16,10]", "ppt:locations=[4],r=10+ppt:locations=[1],r=16")):
        model = small_vit()
        ref, ref_locs = run(model, whole, x)
        out, locs = run(model, split, x)
        blocks = {b for b, _ in locs}  # ToMe alone also records its blocks with r=0; a mix leaves them out
        assert torch.equal(out, ref) and sorted(locs) == [loc for loc in ref_locs if loc[0] in blocks], split


def test_parts_that_remove_nothing_reproduce_the_unpatched_model():
    model = small_vit()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    out, locs = run(model, "ppt:locations=[1,3],r=0+tome:r=[0,0,0,0,0,0]", x)
    assert torch.allclose(out, ref, atol=1e-5) and locs == []  # idle parts install nothing


def test_each_part_reduces_at_its_own_blocks_by_its_own_rule():
    """64 patches + class token: ppt removes 16 at block 1, tome merges 6 then 5 at blocks 2-3,
    topk keeps 3 patch tokens at block 4 and fuses nothing, so 4 tokens reach block 5."""
    model = small_vit()
    out, locs = run(model, "ppt:locations=[1],r=16+tome:r=[0,0,6,5]+topk:locations=[4],tokens=[3]",
                    torch.randn(1, 3, 64, 64))  # batch size 1
    assert out.shape == (1, 10)
    assert locs == [(1, 49), (2, 43), (3, 38), (4, 4)]
    records = tokensparse.location_records(model)
    kept = 64 if records[0].extra["pooled"].item() else 48  # ppt pooled (merged) or pruned 16
    assert [r.size[0, 1:].sum().item() for r in records[:3]] == [kept] * 3  # merged tokens carry their patches


def test_gradients_reach_every_part():
    model = small_vit().train()
    tokensparse.patch(model, "ppt:locations=[1],r=8+tome:r=[0,0,4]")
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in model.blocks[5].parameters())


@pytest.mark.parametrize(("spec", "fragment"), [
    ("ppt+ppt:locations=[3]", "block 3 is reduced by two parts of the mix"),
    ("tome:r=2+ppt", "block 2 is reduced by two parts"),
    ("ppt+dynamicvit", "'dynamicvit' cannot be a part of a mix"),
    ("ppt+evovit", "'evovit' cannot be a part of a mix"),
    ("tome:prop_attn=false,r=[2]+ppt:locations=[3]", "must agree on prop_attn"),
    ("ppt++tome", "empty part"),
    ("ppt+nope:r=1", "unknown method 'nope'"),
    ("ppt:locations=[9]+tome:r=[1]", "outside the model's blocks"),
    ("mix", "a mix needs method specs joined by"),
])
def test_bad_mixes_are_clear_errors_and_leave_the_model_as_it_was(spec, fragment):
    model = small_vit()
    tokensparse.patch(model, "tome:r=2")
    with pytest.raises(TokenSparseError, match=fragment):
        tokensparse.patch(model, spec)
    assert tokensparse.patched_method(model).name == "tome"


def test_mix_is_listed_and_supports_models_its_parts_support():
    info = {m.name: m for m in tokensparse.list_methods()}["mix"]
    assert "tome" in info.summary.lower() or "+" in info.summary
    assert not info.supports(small_vit())  # no parts: nothing to run, left out of bench's defaults
    mix = tokensparse.methods.get_method("mix")
    assert mix(**parse_spec("tome:r=2+ppt:locations=[3]")[1]).supports(small_vit())
    no_class_token = timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg", **SMALL)
    assert not mix(**parse_spec("tome:r=[0,2]+ppt:locations=[3]")[1]).supports(no_class_token)  # ppt needs one
    assert mix(**parse_spec("tome:r=[0,2]+tome:r=[0,0,0,3]")[1]).supports(no_class_token)


def test_bench_takes_a_mix_spec(tmp_path, capsys):
    spec = "ppt:locations=[1],r=4+tome:r=[0,0,2]"
    code = main(["bench", "--model", "test_vit", "--method", spec, "--batch-size", "2", "--runs", "1",
                 "--warmup", "0", "--json", str(tmp_path / "bench.json")])
    assert code == 0, capsys.readouterr().err
    assert spec in (tmp_path / "bench.json").read_text()

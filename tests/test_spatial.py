"""Dynamic spatial sparsification on ConvNeXt and Swin: exactness, routing fidelity, dense
prediction structure, training and calibration, files, errors."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import tokensparse
from tokensparse import TokenSparseError
from tokensparse.cli import main
from tokensparse.families import Route
from tokensparse.methods import dynamicvit as dv
from tokensparse.ops import split_topk
from tokensparse.train import (
    CalibrateConfig,
    DynamicViTLoss,
    Teacher,
    TrainConfig,
    calibrate_dynamicvit,
    finetune_dynamicvit,
)

FULL = ["convnext_tiny", "swin_tiny_patch4_window7_224"]


def small(family: str, **kw) -> torch.nn.Module:
    """A small ConvNeXt / Swin (third stage: 4 blocks, 8x8 positions at 128 px) with random weights."""
    torch.manual_seed(0)
    if family == "convnext":
        args = {"depths": (1, 1, 4, 1), "dims": (16, 32, 64, 128), "num_classes": 10, "ls_init_value": 0.5}
        return timm.create_model("convnext_tiny", **{**args, **kw}).eval()
    args = {"embed_dim": 16, "depths": (1, 1, 4, 1), "num_heads": (1, 2, 4, 8), "window_size": 4, "img_size": 128,
                "num_classes": 10}
    return timm.create_model("swin_tiny_patch4_window7_224", **{**args, **kw}).eval()


def force_slow(model: torch.nn.Module) -> None:
    """Bias every predictor so it sends every position down the slow path (Gumbel noise cannot flip it)."""
    for module in dv.prediction_modules(model).values():
        with torch.no_grad():
            module.predictor.out_conv[4].bias.copy_(torch.tensor([60.0, -60.0]))


# ----------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("name", FULL)
def test_every_position_slow_is_exact_for_logits_and_pyramid(name):
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.0).eval()  # no stochastic depth: train() == eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref_logits = model(x)
        ref_levels = model.forward_intermediates(x, intermediates_only=True)
    tokensparse.patch(model, "dynamicvit:ratios=[1,1,1]")
    with torch.no_grad():
        logits = model(x)
        levels = model.forward_intermediates(x, intermediates_only=True)
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    assert len(levels) == len(ref_levels) == 4
    for a, b in zip(levels, ref_levels):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5
    records = tokensparse.info(model)
    assert [r.block for r in records] == [1, 2, 3] and all(r.grid == (14, 14) for r in records)
    assert all(bool(r.extra["slow"].all()) for r in records)
    # training mode, every position forced slow: the same function, differentiable masks
    force_slow(model)
    model.train()
    with torch.no_grad():
        logits = model(x)
    assert all(bool((m == 1).all()) for m in tokensparse.token_state(model).masks)
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    tokensparse.unpatch(model)
    assert not any("ts_" in k for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref_logits)


# ----------------------------------------------------------------------------- routing fidelity

def _route(n: int, k: int, batch: int) -> Route:
    slow, fast = split_topk(torch.randn(batch, n, generator=torch.Generator().manual_seed(3)), k)
    return Route(slow_idx=slow, fast_idx=fast)


def test_convnext_block_routes_each_position():
    """Slow positions get exactly the block's output; fast ones shortcut + fast path of the full-map dwconv."""
    model = tokensparse.patch(small("convnext"), "dynamicvit")
    blk = model.stages[2].blocks[2]
    with torch.no_grad():
        blk.ts_fast.gamma.fill_(0.7)  # make the fast path visible
        x = torch.randn(2, 64, 8, 8)
        route = _route(64, 20, 2)
        out = blk.forward_routed(x, route)
        full = torch.nn.Module.__call__(blk, x)  # the block's own forward (timm's)
        dw = blk.conv_dw(x).flatten(2).transpose(1, 2)
        fast = x.flatten(2).transpose(1, 2) + blk.ts_fast(dw)
    slow_mask = route.slow_positions(64)
    got, want = out.flatten(2).transpose(1, 2), full.flatten(2).transpose(1, 2)
    assert torch.allclose(got[slow_mask], want[slow_mask], atol=1e-5)
    assert torch.allclose(got[~slow_mask], fast[~slow_mask], atol=1e-5)
    assert int(slow_mask.sum(dim=1).min()) == 20


def test_swin_block_routes_only_the_mlp():
    """Attention runs on every token; slow positions get the block's MLP, fast ones the fast path."""
    model = tokensparse.patch(small("swin"), "dynamicvit")
    blk = model.layers[2].blocks[2]
    with torch.no_grad():
        blk.ts_fast.gamma.fill_(0.7)
        x = torch.randn(2, 8, 8, 64)
        route = _route(64, 20, 2)
        out = blk.forward_routed(x, route).reshape(2, 64, 64)
        full = torch.nn.Module.__call__(blk, x).reshape(2, 64, 64)
        after_attn = (x + blk._attn(blk.norm1(x))).reshape(2, 64, 64)
        fast = after_attn + blk.ts_fast(after_attn)
    slow_mask = route.slow_positions(64)
    assert torch.allclose(out[slow_mask], full[slow_mask], atol=1e-5)
    assert torch.allclose(out[~slow_mask], fast[~slow_mask], atol=1e-5)


@pytest.mark.parametrize("family", ["convnext", "swin"])
def test_eval_ratios_and_records(family):
    model = tokensparse.patch(small(family), "dynamicvit:rho=0.7")  # 64 positions: int(64 * r)
    with torch.no_grad():
        assert model(torch.randn(3, 3, 128, 128)).shape == (3, 10)
    records = tokensparse.info(model)
    assert [r.block for r in records] == [1, 2, 3]
    assert [int(r.extra["slow"][0].sum()) for r in records] == [44, 32, 19]  # 0.7, 0.5, 0.3 of 64
    assert all(r.grid == (8, 8) and r.num_tokens == 64 and bool((r.patch_to_token >= 0).all()) for r in records)
    if family == "convnext":  # counted at the model's default input size: 224 px, 14 x 14 positions
        assert dv.describe(model)["tokens"] == [137, 98, 58]
    assert dv.default_ratio_weight(model) == 10.0


# ----------------------------------------------------------------------------- dense prediction

@pytest.mark.parametrize("name", FULL)
def test_features_only_pyramid_feeds_a_per_pixel_head(name):
    torch.manual_seed(0)
    ref_model = timm.create_model(name, features_only=True).eval()
    model = tokensparse.patch(timm.create_model(name, features_only=True).eval(), "dynamicvit:rho=0.7")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref, levels = ref_model(x), model(x)
    assert [tuple(f.shape) for f in levels] == [tuple(f.shape) for f in ref]
    assert [r.block for r in tokensparse.info(model)] == [1, 2, 3]
    # a simple FPN-like per-pixel head: 1x1 conv per level, upsample to the input, sum
    channels = model.feature_info.channels()
    nchw = [f if f.shape[1] == c else f.permute(0, 3, 1, 2) for f, c in zip(levels, channels)]
    heads = [torch.nn.Conv2d(c, 5, 1) for c in channels]
    with torch.no_grad():
        seg = sum(F.interpolate(h(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
                  for h, f in zip(heads, nchw))
    assert seg.shape == (1, 5, 224, 224) and torch.isfinite(seg).all()


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("family", ["convnext", "swin"])
def test_training_mode_gradients_reach_predictors_and_fast_paths(family):
    model = tokensparse.patch(small(family), "dynamicvit").train()
    x = torch.randn(2, 3, 128, 128)
    teacher = Teacher(model)
    t_logits, t_tokens = teacher(x)
    logits = model(x)
    outs = dv.train_outputs(model)
    assert outs.feature_mask is None and outs.features.shape == t_tokens.shape
    assert [m.shape for m in outs.masks] == [(2, 64)] * 3
    loss, parts = DynamicViTLoss(ratio_weight=10.0)(logits, torch.tensor([1, 2]), outs, t_logits, t_tokens)
    loss.backward()
    learned = dv.learned_modules(model)
    assert sorted(learned) == ["blocks.1.fast", "blocks.1.predictor", "blocks.2.fast", "blocks.2.predictor",
                               "blocks.3.fast", "blocks.3.predictor"]
    for name, module in learned.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert all(v.item() >= 0 for v in parts.values())


@pytest.mark.parametrize("family", ["convnext", "swin"])
def test_calibration_runs_and_lowers_the_distillation_loss(family, tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(24, 3, 128, 128), torch.zeros(24, dtype=torch.long))
    model = small(family)
    teacher = Teacher(model)
    cfg = CalibrateConfig(epochs=8, batch_size=8, lr=2e-3, flip=False, warmup_epochs=0)
    x = data.tensors[0]

    def distance(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return F.mse_loss(m.eval()(x), teacher(x)[0]).item()

    before = distance(tokensparse.patch(small(family), "dynamicvit:rho=0.6"))
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate_dynamicvit(model, data, "dynamicvit:rho=0.6", cfg, out=tmp_path / "parts.safetensors", progress=False)
    after = distance(model)
    assert after < before, (before, after)
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in backbone.items())  # the backbone stayed frozen
    assert all(p.requires_grad for p in model.parameters())  # and is trainable again afterwards
    reloaded = tokensparse.patch(small(family), "dynamicvit:rho=0.6", predictors=str(tmp_path / "parts.safetensors"))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), model.eval()(x))


def test_finetune_and_cli_on_convnext(tmp_path, capsys):
    model = small("convnext")
    data = TensorDataset(torch.randn(8, 3, 128, 128), torch.randint(0, 10, (8,)))
    cfg = TrainConfig(epochs=1, batch_size=4, warmup_epochs=0, num_workers=0)
    trained = finetune_dynamicvit(model, data, tmp_path / "run", "dynamicvit", cfg, progress=False)
    assert (tmp_path / "run" / "predictors.safetensors").is_file()
    assert "blocks.3.fast.proj.weight" in dv.learned_state(trained)
    # the CLI on a timm ConvNeXt (random weights) and a folder of images
    from PIL import Image
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "wnids.txt").write_text("n00000001 a\nn00000002 b\n")
    for i in range(4):
        arr = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(images / f"n0000000{1 + i % 2}_{i}.JPEG")
    rc = main(["calibrate", "--model", "test_convnext", "--images", str(images), "--epochs", "1",
               "--batch-size", "2", "--out", str(tmp_path / "cnx.safetensors")])
    assert rc == 0, capsys.readouterr().err
    assert "calibrated 4 images" in capsys.readouterr().out
    rc = main(["bench", "--model", "test_convnext", "--runs", "1", "--warmup", "0", "--batch-size", "2",
               "--method", f"dynamicvit:predictors={tmp_path / 'cnx.safetensors'}", "--json", str(tmp_path / "b.json")])
    assert rc == 0, capsys.readouterr().err
    import json
    rows = json.loads((tmp_path / "b.json").read_text())
    assert rows[1]["gmacs"] < rows[0]["gmacs"]


# ----------------------------------------------------------------------------- options and errors

def test_default_locations_follow_the_paper():
    """ConvNeXt-T / Swin-T: blocks 1, 2, 3 of the third stage; deeper third stages: 3, 6, 9 (ConvNeXt), 2, 4, 6 (Swin)."""
    from tokensparse.families import ConvNeXtFamily as convnext
    from tokensparse.families import SwinFamily as swin
    assert convnext.default_locations(9) == swin.default_locations(6) == [1, 2, 3]
    assert convnext.default_locations(27) == [3, 6, 9] and swin.default_locations(18) == [2, 4, 6]
    model = tokensparse.patch(timm.create_model("convnext_small"), "dynamicvit")  # 27 blocks in its third stage
    assert {i: m.ratio for i, m in dv.prediction_modules(model).items()} == {3: 0.7, 6: 0.5, 9: 0.3}
    assert sorted(dv.learned_modules(model)) == sorted(
        [f"blocks.{i}.predictor" for i in (3, 6, 9)] + [f"blocks.{i}.fast" for i in range(3, 27)])


@pytest.mark.parametrize("spec, message", [
    ("dynamicvit:rho=0.4", "rho > 0.4"),
    ("dynamicvit:locations=[4]", "location 4 is outside the model's blocks: valid block indices are 0..3"),
    ("dynamicvit:ratios=[0.5,0.7,0.2]", "must not increase"),
    ("tome", "does not support convnext models"),
])
def test_bad_options(spec, message):
    with pytest.raises(TokenSparseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tokensparse.patch(small("convnext"), spec)


def test_unsupported_models_are_clear_errors():
    with pytest.raises(TokenSparseError, match="GlobalResponseNorm"):
        tokensparse.patch(timm.create_model("convnextv2_atto"), "dynamicvit")
    with pytest.raises(TokenSparseError, match="needs at least 3"):
        tokensparse.patch(timm.create_model("convnext_atto", features_only=True, out_indices=(0, 1)), "dynamicvit")
    with pytest.raises(TokenSparseError, match="features_only"):
        calibrate_dynamicvit(timm.create_model("convnext_atto", features_only=True), TensorDataset(torch.randn(2, 3, 64, 64)),
                  progress=False)

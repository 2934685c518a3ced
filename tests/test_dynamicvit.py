"""DynamicViT: exactness, attention masking, gradients, eval gathering, predictor files, ratio control."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch.utils.data import TensorDataset

import tokensparse
from tokensparse import TokenSparseError
from tokensparse.families import get_family
from tokensparse.methods import dynamicvit as dv
from tokensparse.train import CalibrateConfig, DynamicViTLoss, Teacher, calibrate_dynamicvit
from tokensparse.train.calibrate import forward_from


def tiny(img: int = 64, **kw) -> torch.nn.Module:
    """A 4-block ViT without dropout: 64 patches of 8x8 (locations 1, 2, 3)."""
    torch.manual_seed(0)
    args = {"img_size": img, "patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 2, "num_classes": 10}
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kw}).eval()


MODELS = {
    "cls": lambda: tiny(),
    "reg4_avgpool": lambda: tiny(reg_tokens=4, global_pool="avg"),
    "distilled": lambda: timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=64, patch_size=8, depth=4, embed_dim=64,
        num_heads=2, num_classes=10).eval(),
}


def force_keep(model: torch.nn.Module) -> None:
    """Bias every predictor so it keeps every token (a hard decision Gumbel noise cannot flip)."""
    for stage in dv.prediction_modules(model).values():
        with torch.no_grad():
            stage.predictor.out_conv[4].bias.copy_(torch.tensor([60.0, -60.0]))


@pytest.mark.parametrize("name", list(MODELS))
def test_rho_one_eval_and_all_kept_train_are_exact(name):
    model = MODELS[name]()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    tokensparse.patch(model, "dynamicvit:rho=1")
    with torch.no_grad():
        out = model(x)
    assert (out - ref).abs().max().item() <= 1e-5
    assert [loc.num_tokens for loc in tokensparse.info(model)] == [model.num_prefix_tokens + 64] * 3
    force_keep(model)
    model.train()
    with torch.no_grad():
        out = model(x)
    assert all(bool((m == 1).all()) for m in tokensparse.token_state(model).masks)
    assert (out - ref).abs().max().item() <= 1e-5
    tokensparse.unpatch(model)
    assert not any(hasattr(b, "ts_reducer") for b in model.blocks)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref)


def test_eval_gathers_kept_tokens_and_records_info():
    model = tokensparse.patch(tiny(), "dynamicvit")  # rho 0.7: int(64 * 0.7^k) = 44, 31, 21
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 10)
    recs = tokensparse.info(model)
    assert [r.block for r in recs] == [1, 2, 3]
    assert [r.num_tokens for r in recs] == [45, 32, 22]
    assert all(int(r.kept.sum(dim=1).min()) == r.num_tokens - 1 for r in recs)
    assert dv.describe(model)["tokens"] == [44, 31, 21]


def test_tokens_are_ranked_by_the_keep_margin_which_does_not_saturate():
    """Confident tokens all have log p(keep) == 0 in fp32 (a tie); their margins still differ, and the
    pruner keeps the largest margins. Where log p(keep) has no ties both rank alike."""
    def as_log_probs(margin: torch.Tensor) -> torch.Tensor:  # as the predictor computes them: log_softmax
        return torch.stack([margin, torch.zeros_like(margin)], -1).log_softmax(-1)

    margins = torch.tensor([[30.0, 40.0, 25.0, 35.0, -3.0, 50.0]])
    log_probs = as_log_probs(margins)
    assert (log_probs[0, [0, 1, 2, 3, 5], 0] == 0).all()  # log p(keep) saturates: a five-way tie
    torch.testing.assert_close(dv.keep_margin(log_probs), margins)
    model = tokensparse.patch(tiny(), "dynamicvit:ratios=[0.5],locations=[1]")
    pruner = dv.prediction_modules(model)[1]
    scores = torch.linspace(-20.0, 43.0, 64).roll(7)  # distinct margins, many saturated
    pruner.predictor.forward = lambda x, mask=None: as_log_probs(scores).expand(x.shape[0], -1, -1)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    kept = tokensparse.location_records(model)[0].kept[0]
    assert torch.equal(kept.nonzero().squeeze(1), scores.topk(32).indices.sort().values)
    not_saturated = torch.randn(1, 64, 2).log_softmax(-1)
    assert torch.equal(dv.keep_margin(not_saturated).argsort(), not_saturated[..., 0].argsort())


def test_default_ratios_for_vit_small_match_the_paper():
    m = dv.DynamicViT()
    sched = m.schedule(12)
    assert list(sched) == [3, 6, 9]
    assert [dv.keep_tokens(196, r) for r in sched.values()] == [137, 96, 67]
    assert "dynamicvit" in [i.name for i in tokensparse.list_methods()]


def test_dropped_tokens_do_not_change_kept_outputs_and_grads_reach_predictors():
    model = tokensparse.patch(tiny(), "dynamicvit:rho=0.6").train()
    x = torch.randn(2, 3, 64, 64)
    P = model.num_prefix_tokens

    def run(perturb: bool):
        handle = None
        if perturb:  # add noise to every token dropped at the first location, right after it
            def hook(_module, args):
                keep = tokensparse.token_state(model).attn_policy().unsqueeze(-1)
                noise = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(5))  # not the global RNG
                return (args[0] + 5.0 * noise * (1 - keep),)
            handle = model.blocks[2].register_forward_pre_hook(hook)
        torch.manual_seed(123)  # same Gumbel noise in both runs
        try:
            logits = model(x)
        finally:
            if handle is not None:
                handle.remove()
        return logits, dv.train_outputs(model)

    logits, outs = run(False)
    logits2, outs2 = run(True)
    final = outs.masks[-1] > 0.5
    assert 0 < int(final.sum()) < final.numel()
    assert all(torch.equal(a, b) for a, b in zip(outs.masks, outs2.masks))
    assert (logits - logits2).abs().max().item() <= 1e-5
    kept = final.unsqueeze(-1)
    diff = (outs.features[:, P:] - outs2.features[:, P:]).abs()
    assert (diff * kept).max().item() <= 1e-5
    assert (diff * ~kept).max().item() > 1e-2  # the dropped tokens really were perturbed

    teacher = Teacher(model)
    t_logits, t_tokens = teacher(x)
    loss, _parts = DynamicViTLoss()(logits, torch.tensor([1, 2]), outs, t_logits, t_tokens)
    loss.backward()
    for block, stage in dv.prediction_modules(model).items():
        grads = [p.grad for p in stage.predictor.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), block
        assert sum(g.abs().sum().item() for g in grads) > 0, block
    # gradients also flow through the attention masks alone (no ratio loss)
    model.zero_grad()
    logits, outs = run(False)
    DynamicViTLoss(ratio_weight=0, token_weight=0)(logits, None, outs, t_logits, t_tokens)[0].backward()
    assert all(s.predictor.in_conv[1].weight.grad.abs().sum() > 0 for s in dv.prediction_modules(model).values())


def test_predictor_files_round_trip_and_errors(tmp_path):
    model = tokensparse.patch(tiny(), "dynamicvit")
    for s in dv.prediction_modules(model).values():
        torch.nn.init.normal_(s.predictor.out_conv[4].weight)
    path = dv.save_predictors(model, tmp_path / "p.safetensors")
    other = tokensparse.patch(tiny(), "dynamicvit", predictors=str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))
    with pytest.raises(TokenSparseError, match="not found"):
        tokensparse.patch(tiny(), f"dynamicvit:predictors={tmp_path / 'missing.safetensors'}")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TokenSparseError, match="not a valid safetensors"):
        tokensparse.patch(tiny(), "dynamicvit", predictors=str(bad))
    with pytest.raises(TokenSparseError, match="does not fit this model"):
        tokensparse.patch(tiny(embed_dim=32), "dynamicvit", predictors=str(path))
    with pytest.raises(TokenSparseError, match="locations"):
        tokensparse.patch(tiny(), "dynamicvit:locations=[1,2]", predictors=str(path))
    fresh = tiny()
    with pytest.raises(TokenSparseError):
        tokensparse.patch(fresh, "dynamicvit:locations=[1,2]", predictors=str(path))
    assert not tokensparse.is_patched(fresh) and not any("ts_" in k for k in fresh.state_dict())
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(TokenSparseError, match="not a DynamicViT predictors file"):
        tokensparse.patch(tiny(), "dynamicvit", predictors=str(tmp_path / "foreign.safetensors"))


@pytest.mark.parametrize("spec,match", [
    ("dynamicvit:rho=0", "rho"), ("dynamicvit:rho=1.5", "rho"), ("dynamicvit:ratios=[0.5,0.7]", "increase"),
    ("dynamicvit:gumbel=3", "gumbel"), ("dynamicvit:locations=[9]", "location"), ("dynamicvit:foo=1", "unknown"),
    ("dynamicvit:ratios=[0.5]", "entries"),
])
def test_bad_options(spec, match):
    with pytest.raises(TokenSparseError, match=match):
        tokensparse.patch(tiny(), spec)


def test_calibration_drives_keep_ratios_to_targets():
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 64, 64), torch.zeros(64, dtype=torch.long))
    model = tiny()
    cfg = CalibrateConfig(epochs=12, batch_size=16, lr=3e-3, flip=False, warmup_epochs=0, imitation_epochs=0)
    calibrate_dynamicvit(model, data, "dynamicvit:rho=0.7", cfg, progress=False)
    assert not model.training and model.blocks[0].attn.qkv.weight.requires_grad
    stage_map = dv.prediction_modules(model)
    for s in stage_map.values():
        s.train()
    with torch.no_grad():
        forward_from(model, get_family(model).run_to(data.tensors[0], 1), 1)
    ratios = dv.train_outputs(model).keep_ratios
    targets = [s.ratio for s in stage_map.values()]
    assert all(abs(r - t) <= 0.05 for r, t in zip(ratios, targets)), (ratios, targets)


def test_predictors_file_written_before_the_family_redesign_still_loads():
    """A predictors file written by the code before the model-family redesign (commit f0b9bf1)
    loads unchanged and gives the logits that code gave (same weights, same input)."""
    data = Path(__file__).resolve().parent / "data"
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=4, img_size=64, embed_dim=32, num_heads=2,
                              num_classes=10).eval()
    tokensparse.patch(model, "dynamicvit", locations=[1, 2], predictors=str(data / "dynamicvit_vit_f0b9bf1.safetensors"))
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    expected = torch.load(data / "dynamicvit_vit_f0b9bf1_logits.pt")["logits"]
    assert (out - expected).abs().max().item() <= 1e-5
    assert [loc.num_tokens for loc in tokensparse.location_records(model)] == [12, 8]

"""Evo-ViT on timm LeViT: exactness, attention biases of the slow path, the fast path,
training from scratch, records and errors."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import tokensparse
from tokensparse import TokenSparseError
from tokensparse.families.levit import attention_tokens, gather_bias, token_layer


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def levit(name: str = "levit_128s", **kw) -> torch.nn.Module:
    """A random LeViT whose every part matters: timm starts residual branches at zero (BatchNorm
    weight 0) and attention biases at zero, which would hide mistakes in how they are applied.
    BatchNorm weights (small on residual branches, as in trained models) and attention biases
    are drawn at random, then running statistics are estimated on one random batch."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kw)
    with torch.no_grad():
        for name_, m in model.named_modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                residual = name_.endswith(("proj.ln.bn", "mlp.ln2.bn"))
                m.weight.normal_(0.0, 0.2) if residual else m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
                m.momentum = None  # cumulative average: one batch sets the statistics
        for name_, p in model.named_parameters():
            if "attention_biases" in name_:
                p.normal_(0, 0.5)
        model.train()(torch.randn(8, 3, *model.pretrained_cfg["input_size"][1:]))
    return model.eval()


@pytest.mark.parametrize("name", ["levit_128s", "levit_256", "levit_conv_128s"])
def test_keep_rate_one_with_mean_query_is_exact(name):
    model = levit(name)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
    tokensparse.patch(model, "evovit:keep_rate=1.0,class_token=mean")
    with torch.no_grad():
        out = model(x)
    assert (out - ref).abs().max().item() <= 1e-5
    assert not any("ts_" in k for k in model.state_dict())
    tokensparse.patch(model, "evovit:class_token=mean")  # keep 0.5: really reduced
    with torch.no_grad():
        assert (model(x) - ref).abs().max().item() > 1e-4
    tokensparse.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_slow_path_attention_is_the_full_attention_restricted_to_the_kept_tokens():
    """Informative tokens attend among themselves with exactly the logits (incl. the gathered
    relative-position biases) the unpatched attention gives those token pairs."""
    model = levit("levit_256")
    attn = model.stages[0].blocks[2].attn  # the first evolution block of the default setting
    x = torch.randn(2, 196, 256)
    keep = torch.stack([torch.randperm(196, generator=torch.Generator().manual_seed(s))[:98].sort().values
                        for s in (1, 2)])
    with torch.no_grad():
        B, N, _ = x.shape
        # the unpatched module's computation on the full map (timm's formula)
        q, k, v = attn.qkv(x).view(B, N, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        full_logits = q @ k * attn.scale + attn.get_attention_biases(x.device)
        rows = torch.stack([full_logits[b][:, keep[b]][:, :, keep[b]] for b in range(B)])
        # the slow path: the kept tokens alone, biases gathered
        kept_x = torch.stack([x[b, keep[b]] for b in range(B)])
        qk = token_layer(attn.qkv, kept_x).view(B, 98, attn.num_heads, -1)
        qs, ks, _ = qk.split([attn.key_dim, attn.key_dim, attn.val_dim], dim=3)
        slow_logits = qs.transpose(1, 2) @ ks.permute(0, 2, 3, 1) * attn.scale + \
            gather_bias(attn.get_attention_biases(x.device), keep)
        assert torch.allclose(slow_logits, rows, atol=1e-5)
        # and the attention output of the kept tokens equals full attention with the others masked out
        masked = full_logits.clone()
        for b in range(B):
            drop = torch.ones(N, dtype=torch.bool)
            drop[keep[b]] = False
            masked[b][..., drop] = float("-inf")
        ref = (masked.softmax(-1) @ v).transpose(1, 2).reshape(B, N, attn.val_attn_dim)
        ref = attn.proj(ref)
        out, _ = attention_tokens(attn, kept_x, gather_bias(attn.get_attention_biases(x.device), keep))
        assert torch.allclose(out, torch.stack([ref[b, keep[b]] for b in range(B)]), atol=1e-5)


@pytest.mark.parametrize("update", ["representative", "carry"])
def test_placeholders_move_by_one_shared_change(update):
    """At the end of a stage every placeholder equals its value after the stage's downsampling
    plus the representative token's change (zero with update=carry)."""
    from tokensparse.families.levit import downsample_tokens
    model = tokensparse.patch(levit("levit_128s"), f"evovit:class_token=mean,update={update}")
    stage = model.stages[2]
    seen = {}
    stage.register_forward_hook(lambda m, args, out: seen.update(inp=args[0], out=out))
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
        start, _ = downsample_tokens(stage.downsample, seen["inp"], 0)  # the stage's map before its blocks
    informative = [r for r in tokensparse.info(model) if r.stage == 2][-1].extra["informative"]
    assert informative.sum(dim=1).tolist() == [8, 8]  # keep 0.5 of 4 x 4
    change = (seen["out"] - start)[~informative].view(2, 8, -1)  # the 8 placeholders of each image
    assert torch.allclose(change, change[:, :1].expand_as(change), atol=1e-5)
    if update == "carry":
        assert change.abs().max().item() <= 1e-6
    else:
        assert change.abs().max().item() > 1e-3
    assert (seen["out"] - start)[informative].abs().max().item() > 1e-3


def test_trains_from_scratch_with_a_new_class_token():
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", img_size=96, num_classes=4)
    tokensparse.patch(model, "evovit")  # class_token=add, pool=model (mean of tokens)
    assert "ts_cls_token" in dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (32,), generator=g)
    x = torch.randn(32, 3, 96, 96, generator=g) * 0.5
    x += torch.nn.functional.one_hot(y, 4).float().repeat_interleave(24, 1)[:, None, :, None] * 2  # a learnable cue
    loss_fn = torch.nn.CrossEntropyLoss()

    def full_loss() -> float:
        with torch.no_grad():
            return loss_fn(model.eval()(x), y).item()

    before = full_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(30):
        model.train()
        idx = torch.arange(8) + 8 * (step % 4)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        if step == 29:  # (at step 0 timm's zero-initialised residual BatchNorms still block most gradients)
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, f"no gradient reached {missing}"
        opt.step()
    after = full_loss()
    assert after < 0.7 * before, (before, after)
    # train() and eval() compute the same function once BatchNorm uses its running statistics
    model.train()
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), model.eval()(x), atol=1e-5)


def test_records_defaults_and_heads():
    model = tokensparse.patch(levit("levit_256"), "evovit")
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    recs = tokensparse.info(model)
    # the paper's LeViT setting: from block 2 of stage 1, from block 0 of stages 2 and 3, keep 0.5
    assert [(r.stage, r.block) for r in recs] == [(0, 2), (0, 3)] + [(1, b) for b in range(4)] + [(2, b) for b in range(4)]
    # int(N * 0.5) informative tokens, as the authors' code (49 -> 24)
    assert [int(r.extra["informative"].sum()) for r in recs] == [98, 98] + [24] * 4 + [8] * 4
    assert [r.grid for r in recs][::2] == [(14, 14), (7, 7), (7, 7), (4, 4), (4, 4)]
    assert all(r.num_prefix == 1 for r in recs)
    feats = model.forward_features(torch.randn(1, 3, 224, 224))
    assert feats.shape == (1, 1 + 16, 512)
    both = tokensparse.patch(levit("levit_256"), "evovit:pool=both")
    token = tokensparse.patch(levit("levit_256"), "evovit:pool=token")
    mean = tokensparse.patch(levit("levit_256"), "evovit:pool=mean")
    for m in (both, token, mean):
        m.ts_cls_token.data.copy_(model.ts_cls_token.data)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(both(x), (token(x) + mean(x)) / 2, atol=1e-5)
    from tokensparse.viz import token_maps
    fig = token_maps(levit("levit_128s"), ["evovit:class_token=mean"], _photo())
    assert len(fig.axes) == 1 + 7  # input + 3 blocks of stage 2 + 4 of stage 3


def _photo():
    import tempfile

    import numpy as np
    from PIL import Image
    with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as f:
        path = f.name
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 240, 3), dtype=np.uint8)).save(path)
    return path


def test_listed_for_levit_and_bench_picks_it():
    from tokensparse.cli import default_specs
    model = timm.create_model("levit_128s")
    assert default_specs(model) == ["evovit"]
    defaults = {o.name: o.default for m in tokensparse.list_methods() if m.name == "evovit" for o in m.options}
    assert defaults["class_token"] is None and defaults["starts"] is None and defaults["pool"] == "model"


@pytest.mark.parametrize("spec, message", [
    ("evovit:pool=token,class_token=mean", "needs the class token"),
    ("evovit:starts=[2,0]", "starts has 2 entries but this LeViT has 3 stages"),
    ("evovit:starts=[0,0,0]", "starts[0] must be >= 1"),
    ("evovit:split=block", "for LeViT use starts"),
    ("evovit:keep_rate=[0.5,0.5]", "keep_rate has 2 entries"),
    ("evovit:class_token=cls", "class_token must be one of add, mean"),
    ("tome", "does not support levit models"),
])
def test_bad_options(spec, message):
    with pytest.raises(TokenSparseError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tokensparse.patch(timm.create_model("levit_128s"), spec)


def test_vit_rejects_levit_options_and_levit_rejects_wrong_input_size():
    with pytest.raises(TokenSparseError, match="LeViT models only"):
        tokensparse.patch(timm.create_model("vit_tiny_patch16_224", depth=4), "evovit:class_token=add")
    model = tokensparse.patch(timm.create_model("levit_128s"), "evovit")
    with pytest.raises(TokenSparseError, match="224"):
        model(torch.randn(1, 3, 160, 160))
    unpatched = copy.deepcopy(model)
    tokensparse.unpatch(unpatched)
    assert not hasattr(unpatched, "ts_cls_token")

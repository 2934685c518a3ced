"""Hugging Face transformers models: every supported class from a tiny random config, and ViT-Tiny's
real weights converted from timm.

References run with ``attn_implementation="sdpa"`` (transformers' default): the patched
attention always calls ``scaled_dot_product_attention`` itself, so with nothing reduced the
two run the same kernel on the same tensors (here: bit-identical). Against an eager
reference they differ by summation order (measured up to 1.1e-6 on these configs, inside
the 1e-5 bound).

The real-weights part is six passes of the transformers ViT-Tiny over the first 125 of the shared
images (unreduced and with five methods), compared with the timm passes every real-weights test
shares (conftest.py: ``vit_tiny_real``): the two implementations must give the same predictions,
which a quarter of the images shows as well as all of them (benchmarks/results/hf_vit_tiny_bench.txt
has all 500).
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import timm
import torch
import transformers as T
from conftest import REAL_SPECS, VIT_TINY, run_batches

import tokensparse
from tokensparse import TokenSparseError
from tokensparse.families import FAMILIES, get_family, swap_class
from tokensparse.families.hf import HF_FAMILIES, SUPPORTED_TRANSFORMERS, HFFamily
from tokensparse.families.hf_convert import vit_from_timm
from tokensparse.families.hf_siglip import SiglipTokenHead
from tokensparse.methods import dynamicvit as dv
from tokensparse.methods import get_method
from tokensparse.state import TokenState

SIZE, PATCH = 64, 8  # 64 patch tokens
CFG = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "image_size": SIZE, "patch_size": PATCH,
       "attn_implementation": "sdpa"}
TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": 49408}


def _vit(cls, config_cls, **kw):
    return cls(config_cls(**CFG, intermediate_size=64, **kw))


def _dino(cls, config_cls, **kw):
    return cls(config_cls(**CFG, mlp_ratio=2, **kw))


def _tower(cls, config_cls, **kw):
    return cls(config_cls(**CFG, intermediate_size=64, **kw))


def _pair(cls, config_cls):
    vision = dict(CFG, intermediate_size=64)
    vision.pop("attn_implementation")
    return cls(config_cls(vision_config=vision, text_config=TEXT, num_labels=5, attn_implementation="sdpa"))


BUILDERS = {
    "ViTModel": lambda: _vit(T.ViTModel, T.ViTConfig),
    "ViTForImageClassification": lambda: _vit(T.ViTForImageClassification, T.ViTConfig, num_labels=5),
    "DeiTModel": lambda: _vit(T.DeiTModel, T.DeiTConfig),
    "DeiTForImageClassification": lambda: _vit(T.DeiTForImageClassification, T.DeiTConfig, num_labels=5),
    "DeiTForImageClassificationWithTeacher": lambda: _vit(T.DeiTForImageClassificationWithTeacher, T.DeiTConfig,
                                                          num_labels=5),
    "Dinov2Model": lambda: _dino(T.Dinov2Model, T.Dinov2Config),
    "Dinov2ForImageClassification": lambda: _dino(T.Dinov2ForImageClassification, T.Dinov2Config, num_labels=5),
    "Dinov2WithRegistersModel": lambda: _dino(T.Dinov2WithRegistersModel, T.Dinov2WithRegistersConfig,
                                              num_register_tokens=3),
    "Dinov2WithRegistersForImageClassification": lambda: _dino(
        T.Dinov2WithRegistersForImageClassification, T.Dinov2WithRegistersConfig, num_register_tokens=3, num_labels=5),
    "CLIPVisionModel": lambda: _tower(T.CLIPVisionModel, T.CLIPVisionConfig),
    "CLIPVisionModelWithProjection": lambda: _tower(T.CLIPVisionModelWithProjection, T.CLIPVisionConfig,
                                                    projection_dim=16),
    "CLIPForImageClassification": lambda: _pair(T.CLIPForImageClassification, T.CLIPConfig),
    "SiglipVisionModel": lambda: _tower(T.SiglipVisionModel, T.SiglipVisionConfig),
    "SiglipForImageClassification": lambda: _pair(T.SiglipForImageClassification, T.SiglipConfig),
}
PREFIX = {"DeiT": 2, "Dinov2WithRegisters": 4, "Siglip": 0}  # by class-name prefix; others 1
FAMILY_OF = {"ViT": "hf-vit", "DeiT": "hf-vit", "Dinov2": "hf-dinov2", "CLIP": "hf-clip", "Siglip": "hf-siglip"}
EXACT = ["topk:keep_rate=1", "evit:keep_rate=1", "tome:r=0", "mctf:r=0", "ppt:r=0", "evovit:keep_rate=1.0",
         "dynamicvit:rho=1", "tofu:r=0", "pitome:ratio=1.0", "zerotprune:r=0"]
METHODS = ["topk", "evit", "tome", "mctf", "ppt", "evovit", "dynamicvit", "tofu", "pitome", "diffrate", "zerotprune"]
SPECS = [*METHODS, "mctf:one_step_ahead=true"]  # each method at its defaults, and MCTF's other form
CLASS_TOKEN_METHODS = {"topk", "evit", "ppt", "evovit", "diffrate"}


def num_prefix(name: str) -> int:
    return next((n for k, n in PREFIX.items() if name.startswith(k)), 1)


def tensors(out) -> dict[str, torch.Tensor]:
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def grads_after_backward(model: torch.nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the parameters a training step on ``x`` gives a nonzero gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    sum(v.float().square().mean() for v in tensors(model(x)).values()).backward()
    found = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    return found


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny random models run on one thread: threading them only adds synchronisation (and on a busy
    machine, waits for the other thread); the real-weights evaluation sets its own two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built():
    """``name -> (model, input, reference outputs)``; each test leaves its model unpatched."""
    torch.manual_seed(0)
    out = {}
    for name, build in BUILDERS.items():
        model = build().eval()
        x = torch.randn(3, 3, SIZE, SIZE)
        with torch.no_grad():
            out[name] = (model, x, tensors(model(x)))
    return out


def test_every_class_has_a_family_and_is_listed(built):
    declared = {c for f in HF_FAMILIES for c in f.classes}
    assert declared == set(BUILDERS)
    for name, (model, _, _) in built.items():
        family = get_family(model)
        assert isinstance(family, HFFamily) and family.matches(model)
        assert family.name == next(f for k, f in FAMILY_OF.items() if name.startswith(k))
        assert family.num_prefix == num_prefix(name), name
        assert family.has_class_token == (not name.startswith("Siglip"))
        assert family.depth == 4 and family.width() == 32 and family.num_positions() == (SIZE // PATCH) ** 2
    assert {f.name for f in HF_FAMILIES} <= {f.name for f in FAMILIES}
    listing = {m.name: m.families for m in tokensparse.list_methods()}
    for method in METHODS:  # SigLIP has no class token: only the methods that need none list it
        assert {"hf-vit", "hf-dinov2", "hf-clip"} <= set(listing[method])
        assert ("hf-siglip" in listing[method]) == (method not in CLASS_TOKEN_METHODS)


@pytest.mark.parametrize("spec", EXACT)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_keep_everything_is_exact_and_unpatch_restores(built, name, spec):
    model, x, ref = built[name]
    method = spec.split(":")[0]
    if name.startswith("Siglip") and method in CLASS_TOKEN_METHODS:
        with pytest.raises(TokenSparseError, match="no class token"):
            tokensparse.patch(model, spec)
        assert not tokensparse.is_patched(model)
        return
    classes = [type(m) for m in model.modules()]
    tokensparse.patch(model, spec)
    try:
        assert type(model) is not classes[0]
        with torch.no_grad():
            out = tensors(model(x))
        assert set(out) == set(ref)
        for key in ref:
            assert (out[key] - ref[key]).abs().max().item() <= 1e-5, f"{name} {spec} {key}"
    finally:
        tokensparse.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    with torch.no_grad():
        again = tensors(model(x))
    assert all(torch.equal(again[k], ref[k]) for k in ref)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_methods_at_defaults_eval_and_train(built, name, spec):
    model, x, ref = built[name]
    method = spec.split(":")[0]
    if not get_method(method)().supports(model):
        assert name.startswith("Siglip") and method in CLASS_TOKEN_METHODS
        return
    reached = grads_after_backward(model, x)  # unpatched: every parameter the loss depends on
    model.eval()
    tokensparse.patch(model, spec)
    new = {n for n, _ in model.named_parameters() if ".ts_" in n}  # DynamicViT's predictors
    assert bool(new) == (method == "dynamicvit")
    try:
        for B in (1, 3):
            model.eval()
            with torch.no_grad():
                out = tensors(model(x[:B]))
            assert {k: v.shape[1:] for k, v in out.items() if k != "last_hidden_state"} == \
                   {k: v.shape[1:] for k, v in ref.items() if k != "last_hidden_state"}
            records = tokensparse.location_records(model)
            assert records and all(r.num_prefix == num_prefix(name) for r in records)
            if method != "evovit":  # evovit keeps the full map; the others end with fewer tokens
                assert records[-1].num_tokens < num_prefix(name) + (SIZE // PATCH) ** 2
            missing = (reached | new) - grads_after_backward(model, x[:B])
            assert not missing, f"{name} {method} B={B}: no gradient for {sorted(missing)}"
    finally:
        model.eval()
        tokensparse.unpatch(model)


@pytest.mark.parametrize("name", ["ViTForImageClassification", "Dinov2WithRegistersForImageClassification",
                                  "CLIPVisionModel", "SiglipVisionModel"])
def test_calibration_hooks_run_the_model_in_two_parts(built, name):
    model, x, _ = built[name]
    tokensparse.patch(model, "dynamicvit:rho=1")
    try:
        family = get_family(model)
        enc = family.encoder
        with torch.no_grad():
            full = enc(x).last_hidden_state
            for start in (1, 3):
                feats = family.features_from(family.run_to(x, start), start)
                assert (family.feature_tokens(feats) - full).abs().max().item() <= 1e-5
        model.train()
        model(x)
        outputs = dv.train_outputs(model)
        assert outputs.features.shape == full.shape and outputs.num_prefix == num_prefix(name)
        assert len(outputs.masks) == 3
    finally:
        model.eval()
        tokensparse.unpatch(model)


@pytest.mark.parametrize("name", ["Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification",
                                  "CLIPForImageClassification", "SiglipForImageClassification"])
def test_mean_pooling_heads_weight_merged_tokens_by_size(built, name):
    model, x, _ = built[name]
    tokensparse.patch(model, "tome:r=12")
    try:
        with torch.no_grad():
            logits = model(x).logits
            tokens = get_family(model).encoder(x).last_hidden_state  # the same pass again
        size = tokensparse.location_records(model)[-1].size
        P = num_prefix(name)
        w = size[:, P:].unsqueeze(-1)
        weighted = (tokens[:, P:] * w).sum(dim=1) / w.sum(dim=1)
        plain = tokens[:, P:].mean(dim=1)
        head = (lambda m: torch.cat([tokens[:, 0], m], dim=1)) if name.startswith("Dinov2") else (lambda m: m)
        expected, unweighted = model.classifier(head(weighted)), model.classifier(head(plain))
        assert (logits - expected).abs().max().item() <= 1e-5
        assert (logits - unweighted).abs().max().item() > 1e-4  # sizes really differ
    finally:
        tokensparse.unpatch(model)


def test_siglip_probe_weights_a_merged_token_as_the_patches_it_holds(built):
    head = copy.deepcopy(built["SiglipVisionModel"][0].head).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 6, 32)
    dup = torch.cat([x, x[:, 2:3], x[:, 2:3]], dim=1)  # token 2 three times
    drop = torch.cat([x[:, :4], x[:, 5:]], dim=1)     # token 4 removed
    with torch.no_grad():
        ref_dup, ref_drop = head(dup), head(drop)
        state = TokenState()
        swap_class(head, SiglipTokenHead, state)
        state.size = torch.tensor([1.0, 1, 3, 1, 1, 1]).expand(2, -1).unsqueeze(-1)
        merged = head(x)
        state.size, state.policy = None, torch.tensor([1.0, 1, 1, 1, 0, 1]).expand(2, -1).unsqueeze(-1)
        masked = head(x)
        state.policy = None
        plain = head(x)
    assert (merged - ref_dup).abs().max().item() <= 1e-5
    assert (masked - ref_drop).abs().max().item() <= 1e-5
    assert (plain - ref_dup).abs().max().item() > 1e-4


def test_prefix_tokens_are_never_reduced(built):
    model, x, _ = built["Dinov2WithRegistersModel"]
    tokensparse.patch(model, "tome:r=10")
    try:
        with torch.no_grad():
            out = model(x).last_hidden_state
        records = tokensparse.location_records(model)
        assert out.shape[1] == records[-1].num_tokens == 4 + 64 - 4 * 10
        assert all((r.patch_to_token >= 4).all() and (r.size[:, :4] == 1).all() for r in records)
        assert torch.allclose(records[-1].size[:, 4:].sum(dim=1), torch.full((3,), 64.0))
    finally:
        tokensparse.unpatch(model)


def test_deepcopy_of_a_patched_model_is_independent(built):
    model, x, _ = built["Dinov2ForImageClassification"]
    tokensparse.patch(model, "tome:r=8")
    try:
        twin = copy.deepcopy(model)
        with torch.no_grad():
            assert torch.equal(model(x).logits, twin(x).logits)
        assert tokensparse.token_state(twin) is not tokensparse.token_state(model)
        tokensparse.unpatch(twin)
        assert tokensparse.is_patched(model) and not tokensparse.is_patched(twin)
        assert type(twin) is T.Dinov2ForImageClassification
    finally:
        tokensparse.unpatch(model)


def test_other_input_size_and_tuple_outputs(built):
    model, _, _ = built["ViTForImageClassification"]
    x = torch.randn(2, 3, 48, 48)  # 36 patches, position embedding interpolated
    with torch.no_grad():
        ref = model(x, interpolate_pos_encoding=True).logits
    tokensparse.patch(model, "evit:keep_rate=1")
    try:
        with torch.no_grad():
            out = model(x, interpolate_pos_encoding=True, return_dict=False)
        assert isinstance(out, tuple) and (out[0] - ref).abs().max().item() <= 1e-5
        tokensparse.patch(model, "tome:r=4")
        with torch.no_grad():
            model(x, interpolate_pos_encoding=True)
        assert [r.num_tokens for r in tokensparse.location_records(model)] == [1 + 36 - 4 * i for i in (1, 2, 3, 4)]
    finally:
        tokensparse.unpatch(model)


def test_clear_errors(built):
    model, x, _ = built["ViTModel"]
    # not a supported transformers class
    with pytest.raises(TokenSparseError, match="not supported.*ViTModel.*SiglipVisionModel"):
        tokensparse.patch(T.ViTForMaskedImageModeling(T.ViTConfig(**CFG, intermediate_size=64)), "tome")
    # what a reduced model cannot give
    tokensparse.patch(model, "tome")
    try:
        for kw in ({"output_attentions": True}, {"output_hidden_states": True}):
            with pytest.raises(TokenSparseError, match=next(iter(kw))):
                model(x, **kw)
        with pytest.raises(TokenSparseError, match="attention masks"):
            model(x, attention_mask=torch.arange(65).expand(3, -1) < 60)
        with pytest.raises(TokenSparseError, match="gradient checkpointing"):
            model.activation_checkpointing_enable()
        with torch.no_grad():
            model(x)  # still usable after the refusals
    finally:
        tokensparse.unpatch(model)
    model.activation_checkpointing_enable()
    try:
        with pytest.raises(TokenSparseError, match="gradient checkpointing"):
            tokensparse.patch(model, "tome")
    finally:
        model.activation_checkpointing_disable()
    assert not tokensparse.is_patched(model)


def test_unsupported_transformers_layout_names_the_supported_versions(built):
    model = copy.deepcopy(built["CLIPVisionModel"][0])
    del model.encoder.layers[2].self_attn.q_proj  # as if transformers renamed it
    with pytest.raises(TokenSparseError, match=r"layer 2.*q_proj.*transformers>=5,<6") as err:
        tokensparse.patch(model, "tome")
    assert SUPPORTED_TRANSFORMERS in str(err.value) and T.__version__ in str(err.value)
    assert not tokensparse.is_patched(model)
    model = copy.deepcopy(built["Dinov2Model"][0])
    model.encoder.layers = model.encoder.layer  # an encoder laid out differently
    del model.encoder.layer
    with pytest.raises(TokenSparseError, match="no encoder.layer layer list.*transformers>=5,<6"):
        tokensparse.patch(model, "tome")


def test_import_and_listing_work_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"  # any import of transformers fails
            "import tokensparse\n"
            "fams = {m.name: m.families for m in tokensparse.list_methods()}\n"
            "assert 'hf-siglip' in fams['tome'] and 'hf-dinov2' in fams['dynamicvit'], fams\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ----------------------------------------------------------------------------- real weights

TRAINING_FREE = list(REAL_SPECS)  # topk, evit at keep 0.7, tome:r=13, ppt, evovit:keep_rate=0.7
REAL_IMAGES = 125


@pytest.fixture(scope="module")
def real_predictions(vit_tiny_real, vit_tiny_weights, tmp_path_factory):
    """Top-1 of timm ViT-Tiny (the shared session passes) and of its transformers conversion (saved and
    loaded back), unreduced and with each training-free method, on the first :data:`REAL_IMAGES` shared
    images (timm's preprocessing for both)."""
    tm = timm.create_model(VIT_TINY, pretrained=True, pretrained_cfg_overlay={"file": str(vit_tiny_weights)}).eval()
    out = tmp_path_factory.mktemp("vit-tiny-hf")
    vit_from_timm(tm).save_pretrained(out)
    hf = T.ViTForImageClassification.from_pretrained(out).eval()
    n = REAL_IMAGES
    preds: dict[str, torch.Tensor] = {"timm logits": vit_tiny_real.logits["none"][:n]}
    for spec in [None, *TRAINING_FREE]:
        if spec is not None:
            tokensparse.patch(hf, spec)
        logits = run_batches(hf, vit_tiny_real.images[:n])
        tokensparse.unpatch(hf)
        preds["hf" if spec is None else f"hf {spec}"] = logits.argmax(dim=-1)
        preds["timm" if spec is None else f"timm {spec}"] = vit_tiny_real.logits[spec or "none"][:n].argmax(dim=-1)
        if spec is None:
            preds["hf logits"] = logits
    return preds


def test_converted_vit_predicts_like_timm(real_predictions):
    assert len(real_predictions["hf"]) == REAL_IMAGES
    agreement = (real_predictions["hf"] == real_predictions["timm"]).float().mean().item()
    assert agreement == 1.0, agreement
    assert (real_predictions["hf logits"] - real_predictions["timm logits"]).abs().max().item() <= 1e-3


@pytest.mark.parametrize("spec", TRAINING_FREE)
def test_training_free_methods_agree_with_timm(real_predictions, spec):
    agreement = (real_predictions[f"hf {spec}"] == real_predictions[f"timm {spec}"]).float().mean().item()
    assert agreement >= 0.99, f"{spec}: {agreement:.3f}"
    changed = (real_predictions[f"hf {spec}"] != real_predictions["hf"]).sum().item()
    assert changed > 0  # the method really ran on the transformers model

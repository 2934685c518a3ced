"""Deploy: every method's eval path on every family it supports compiles with
``torch.compile(fullgraph=True)`` (no graph break: no data-dependent Python control flow or
host synchronisation) and exports to ONNX with a dynamic batch (exported at batch 2, run by
onnxruntime at batch 3), both within 1e-4 of eager PyTorch.

Tiny configs (two blocks where a method allows, 32-pixel images) keep this inside the CI
budget. Every (family, method) pair is compiled with ``fullgraph=True`` through AOT autograd
(``aot_eager``: dynamo's whole-graph capture, functionalisation and decompositions, without
C++ code generation), and one pair with inductor, the default backend, whose C++ compilation
takes about 15 s per model on this CPU. An ONNX export costs 2-10 s even for these models
(symbolic tracing of a dynamic batch), so CI exports a covering set: every method on the timm
ViT and every other family with at least one method, each with a dynamic batch;
``benchmarks/deploy_matrix.py`` exports every pair and compiles every pair with inductor
(``deploy_matrix.txt``).
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable

import pytest
import timm
import torch
import transformers as T
from torch import nn

import tokensparse
from tokensparse import TokenSparseError
from tokensparse.cli import main
from tokensparse.export import TensorOutputs, export_onnx
from tokensparse.spec import parse_spec

VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 10}
HF = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
      "attn_implementation": "sdpa"}


def _levit() -> nn.Module:
    """A tiny LeViT whose residual branches and attention biases matter (timm starts both at zero,
    which would make every block an identity), with batch-norm statistics from one random batch."""
    model = timm.create_model("levit_128s", img_size=64, num_classes=4, depth=(3, 1, 1), embed_dim=(32, 48, 64),
                              num_heads=(2, 3, 4), key_dim=8)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.normal_(0.0, 0.2) if name.endswith(("proj.ln.bn", "mlp.ln2.bn")) else m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
                m.momentum = None  # cumulative average: one batch sets the statistics
        for name, p in model.named_parameters():
            if "attention_biases" in name:
                p.normal_(0, 0.5)
        model.train()(torch.randn(8, 3, 64, 64))
    return model.eval()


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "vit": lambda: timm.create_model("vit_tiny_patch16_224", **VIT),
    "levit": _levit,
    "convnext": lambda: timm.create_model("convnext_tiny", depths=(1, 1, 3, 1), dims=(16, 32, 64, 128),
                                          num_classes=10, ls_init_value=0.5),
    "swin": lambda: timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1, 2, 1),
                                      num_heads=(1, 2, 4, 8), window_size=4, img_size=128, num_classes=10),
    "hf-vit": lambda: T.ViTForImageClassification(T.ViTConfig(**HF, intermediate_size=64, num_labels=5)),
    "hf-dinov2": lambda: T.Dinov2WithRegistersForImageClassification(
        T.Dinov2WithRegistersConfig(**HF, mlp_ratio=2, num_register_tokens=2, num_labels=5)),
    "hf-clip": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**HF, intermediate_size=64)),
    "hf-siglip": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**HF, intermediate_size=64)),
}
SIZE = {"levit": 64, "convnext": 128, "swin": 128}
VIT_METHODS = ["topk", "evit", "tome:r=2", "mctf:r=[4]", "mctf:one_step_ahead=true", "ppt:r=3", "evovit", "dynamicvit",
               "tofu:r=2,switch=1", "pitome:r=2", "diffrate:prune_kept=[12,10],merge_kept=[10,8]", "zerotprune:r=2"]
MIX = "ppt:locations=[0],r=3+tome:r=[0,2]"
CASES = [
    *[("vit", m) for m in VIT_METHODS], ("vit", MIX),
    ("levit", "evovit"), ("levit", "evovit:class_token=mean"),
    ("convnext", "dynamicvit"), ("swin", "dynamicvit"),
    *[(f, m) for f in ("hf-vit", "hf-dinov2", "hf-clip") for m in VIT_METHODS],
    ("hf-siglip", "tome:r=2"), ("hf-siglip", "mctf:one_step_ahead=true"), ("hf-siglip", "dynamicvit"),
    ("hf-siglip", "tofu:r=2,switch=1"), ("hf-siglip", "pitome:r=2"), ("hf-siglip", "zerotprune:r=2"),
]
ONNX_CASES = [
    *[("vit", m) for m in VIT_METHODS], ("vit", MIX),
    ("levit", "evovit"), ("convnext", "dynamicvit"), ("swin", "dynamicvit"),
    ("hf-vit", "tome:r=2"), ("hf-dinov2", "ppt:r=3"), ("hf-clip", "evovit"), ("hf-siglip", "dynamicvit"),
]
"""Exported in CI: every method (on the timm ViT) and every family (each with a method whose
by-products its attention must provide: ToMe's keys, PPT's value norms, Evo-ViT's class row)."""


def test_cases_cover_every_supported_method_and_family():
    """The compile matrix is every (family, method) pair the library supports; the ONNX set
    covers every method and every family."""
    covered = {(f, parse_spec(m)[0]) for f, m in CASES}
    built = {family: build() for family, build in BUILDERS.items()}
    for info in tokensparse.list_methods():
        for family, model in built.items():
            if info.supports(model):
                assert (family, info.name) in covered, (family, info.name)
    assert set(ONNX_CASES) <= set(CASES)
    assert {f for f, _ in ONNX_CASES} == set(BUILDERS)
    assert {parse_spec(m)[0] for _, m in ONNX_CASES} == {info.name for info in tokensparse.list_methods()}


@pytest.fixture(scope="module")
def models() -> dict[tuple[str, str], tuple[nn.Module, nn.Module]]:
    """``(family, spec) -> (patched model, unpatched model)`` in eval mode, built once."""
    out = {}
    for family, spec in CASES:
        torch.manual_seed(0)
        base = BUILDERS[family]().eval()
        out[family, spec] = tokensparse.patch(copy.deepcopy(base), spec).eval(), base
    return out


def _inputs(family: str, batch: int) -> torch.Tensor:
    size = SIZE.get(family, 32)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def _max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def _compiled_diff(model: nn.Module, family: str, backend: str) -> float:
    wrapped = TensorOutputs(model).eval()
    x = _inputs(family, 2)
    with torch.no_grad():
        want = wrapped(x)
        torch._dynamo.reset()
        got = torch.compile(wrapped, fullgraph=True, backend=backend)(x)
    return _max_diff(got, want)


def _backend(family: str, spec: str) -> str:
    """``aot_eager`` (graph capture, then AOT autograd's functionalized trace) for every method on the
    timm families and for the exported cases; on the other transformers cases, whose methods that
    trace already covers on the timm ViT and whose families it covers in ONNX_CASES, the capture
    alone (``eager``: fullgraph, fake-tensor shapes; half the time)."""
    return "eager" if family.startswith("hf-") and (family, spec) not in ONNX_CASES else "aot_eager"


@pytest.mark.parametrize(("family", "spec"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_compiles_with_fullgraph(models, family, spec):
    model, base = models[family, spec]
    assert _compiled_diff(model, family, _backend(family, spec)) <= 1e-4
    records = tokensparse.location_records(model)
    assert records  # the method ran
    x = _inputs(family, 2)
    with torch.no_grad():  # and it changed the output: the compiled model is not the unreduced one
        reduced, unreduced = TensorOutputs(model)(x), TensorOutputs(base)(x)
    assert any(a.shape != b.shape or (a - b).abs().max() > 1e-6 for a, b in zip(reduced, unreduced))


def test_inductor_compiles_a_reduced_model(models):
    """The default backend (C++ code generation): ToMe's merging (sort, scatter-add) and proportional attention."""
    model, _ = models["vit", "tome:r=2"]
    assert _compiled_diff(model, "vit", "inductor") <= 1e-4


OPTIMIZED = {("vit", "ppt:r=3"), ("convnext", "dynamicvit")}
"""Exported with the ONNX optimizer, as users export (it adds about a third to an export's time);
the other cases check the capture and translation alone."""


@pytest.mark.parametrize(("family", "spec"), ONNX_CASES, ids=[f"{f}-{m}" for f, m in ONNX_CASES])
def test_onnx_export_runs_in_onnxruntime_with_a_dynamic_batch(models, family, spec, tmp_path):
    model, _ = models[family, spec]
    size = SIZE.get(family, 32)
    report = export_onnx(model, tmp_path / "m.onnx", batch_size=2, dynamic_batch=True, image_size=(size, size),
                         optimize=(family, spec) in OPTIMIZED)
    assert report.check_batch == 3 and report.max_difference <= 1e-4
    assert report.inputs[0][1][0] == "batch"


class Noisy(nn.Module):
    """A model whose output onnxruntime cannot reproduce (it adds fresh random numbers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3)) + torch.rand(x.shape[0])


def test_export_checks_and_errors(models, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    with pytest.raises(TokenSparseError, match="differs from PyTorch"):
        export_onnx(Noisy(), out, image_size=(8, 8))
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp left
    model, _ = models["vit", "evit"]
    for kwargs, fragment in (({"batch_size": 0}, "batch_size"), ({"batch_size": 1}, "dynamic batch"),
                             ({"image_size": (32,)}, "image_size")):
        with pytest.raises(TokenSparseError, match=fragment):
            export_onnx(model, out, **kwargs)
    with pytest.raises(TokenSparseError, match="is a folder"):
        export_onnx(model, tmp_path)


def test_export_command_on_a_transformers_model(hf_folder, tmp_path, capsys):
    folder = hf_folder
    out = tmp_path / "tiny.onnx"
    code = main(["export", "--model", f"hf:{folder}", "--method", "none", "--out", str(out)])  # reduced: bench below
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert out.is_file() and "images" in stdout and "(batch, 3, 32, 32)" in stdout and "logits" in stdout
    code = main(["export", "--model", f"hf:{folder}", "--method", "nope", "--out", str(out)])
    assert code == 2 and "nope" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-vit")
    torch.manual_seed(0)
    BUILDERS["hf-vit"]().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("runtime", [["--compile", "--compile-backend", "eager"], ["--runtime", "onnxruntime"]],
                         ids=["compile", "onnxruntime"])
def test_bench_times_compiled_and_exported_models(hf_folder, tmp_path, capsys, runtime):
    report = tmp_path / "bench.json"
    code = main(["bench", "--model", f"hf:{hf_folder}", "--method", "tome:r=2", "--batch-size", "2", "--runs", "2",
                 "--warmup", "1", "--json", str(report), *runtime])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads(report.read_text())}
    assert set(rows) == {"none", "tome:r=2"}
    for row in rows.values():
        assert row["compile_s"] > 0 and row["latency_ms"] > 0 and row["img_per_s"] > 0
        assert row["eager_latency_ms"] > 0  # the eager models were timed in the same run
    assert rows["none"]["eager_speedup"] == 1.0 and rows["tome:r=2"]["eager_speedup"] > 0
    assert "seconds (not timed)" in out and "eager" in out


def test_compile_runtime_takes_more_models_than_dynamos_recompile_limit():
    """Models sharing one forward each add a compiled entry; more than dynamo's default limit of 8 still compile."""
    from tokensparse.measure.runtimes import prepare_runtime

    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT).eval()
    models = {"none": base, **{f"tome:r={r}": tokensparse.patch(copy.deepcopy(base), f"tome:r={r}")
                               for r in range(1, 10)}}
    # dynamo's default (timm.optim, imported by the training code, raises it for the whole process)
    with torch._dynamo.config.patch(recompile_limit=8):
        compiled, seconds = prepare_runtime(models, "compile", batch_size=2, input_size=(3, 32, 32), backend="eager")
    assert set(compiled) == set(seconds) == set(models)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        for name, model in models.items():
            assert torch.allclose(compiled[name](x), model(x), atol=1e-5), name

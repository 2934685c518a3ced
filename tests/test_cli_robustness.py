"""Issue 14, section 2: inputs a new user gives that must be clear errors (or honest numbers).

NaN/inf models are errors, never accuracy; one ``error:`` line instead of tracebacks; outputs
and images checked before anything is timed; no silent random DynamicViT predictors; spec
strings (duplicates, quoting); ``--pretrained`` offline; the spread of the speed-up.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

import tokensparse
from tokensparse import cli
from tokensparse.cli import main
from tokensparse.data import ImageNetFolder, check_class_count, scan_images, worker_error_message
from tokensparse.errors import TokenSparseError
from tokensparse.measure import (
    compare,
    compare_throughput,
    evaluate_many,
    measure_variants,
    random_predictors,
    speedup_range,
    timed_runs,
    wide_spread,
)
from tokensparse.methods.dynamicvit import learned_state, save_predictors
from tokensparse.models import create_model, describe_load_error, hub_unreachable, suggest_models
from tokensparse.spec import format_spec, parse_spec
from tokensparse.viz import figure_path

VIT_TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
FAST = ["bench", "--model", "vit_tiny_patch16_224", "--batch-size", "2", "--runs", "1", "--warmup", "0"]
METHODS = ["topk", "evit", "tome", "ppt", "evovit", "dynamicvit"]


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(code: int, out: str, err: str, *fragments: str, after_progress: bool = False) -> str:
    """The one ``error:`` line (exit 2, no traceback) holding every fragment; ``after_progress``:
    stderr may hold a lasting progress bar (train) before it."""
    assert code == 2, out + err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    if after_progress:
        assert sum(ln.startswith("error") for ln in lines) == 1, err
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _never(*args, **kwargs):
    raise AssertionError("reached work that the error should have prevented")


@pytest.fixture()
def few_images(tmp_path, sample_images) -> Path:
    """Three of the shared photos (flat layout) in a folder of their own."""
    root = tmp_path / "few"
    root.mkdir()
    for photo in sorted(sample_images.iterdir())[:3]:
        (root / photo.name).symlink_to(photo)
    return root


@pytest.fixture()
def corrupt_images(few_images, sample_images) -> tuple[Path, Path]:
    """``few_images`` plus a truncated JPEG that sorts first; returns (folder, the bad file)."""
    good = min(sample_images.iterdir())
    bad = few_images / f"{good.name.split('_')[0]}_0000_truncated.JPEG"
    bad.write_bytes(good.read_bytes()[:600])
    return few_images, bad


def _nan_weights(path: Path, model_name: str = "vit_tiny_patch16_224") -> Path:
    state = timm.create_model(model_name).state_dict()
    state["blocks.3.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(state, str(path))
    return path


# ----------------------------------------------------------------------------- 2: NaN / inf

def test_bench_nan_weights_is_an_error_not_agreement_100(capsys, tmp_path, sample_images, sample_wnids):
    weights = _nan_weights(tmp_path / "nan.safetensors")
    line = _error_line(*_run(capsys, FAST + ["--weights", str(weights), "--images", str(sample_images),
                                             "--wnids", str(sample_wnids), "--limit", "2", "--method", "tome"]),
                       "unreduced model", "NaN", "blocks.3.mlp.fc1.weight")
    assert "agree" not in line


def test_bench_nan_predictors_name_the_method(capsys, tmp_path):
    model = tokensparse.patch(timm.create_model("vit_tiny_patch16_224"), "dynamicvit")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "ts_reducer" in n).fill_(float("nan"))
    path = save_predictors(model, tmp_path / "nan_predictors.safetensors")
    line = _error_line(*_run(capsys, FAST + ["--method", f"dynamicvit:predictors={path}"]), "nan_predictors")
    assert "nan" in line.lower()


class _ConstantLogits(nn.Module):
    """A 'model' whose logits are all ``value`` (finite parameters)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1000), self.value) * self.scale


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_are_an_error_not_accuracy(value, sample_images, sample_wnids):
    models = {"reference": _ConstantLogits(value), "reduced": _ConstantLogits(value)}
    with pytest.raises(TokenSparseError, match=r"'reference' gives NaN or inf logits for image '.*\.JPEG'"):
        evaluate_many(models, sample_images, sample_wnids, reference_key="reference", limit=2, progress=False)


def test_sweep_nan_weights_is_an_error(capsys, tmp_path, sample_images, sample_wnids, monkeypatch):
    monkeypatch.setattr(compare, "timed_runs", _never)
    weights = _nan_weights(tmp_path / "nan.safetensors")
    _error_line(*_run(capsys, ["sweep", "--model", "vit_tiny_patch16_224", "--weights", str(weights),
                               "--images", str(sample_images), "--wnids", str(sample_wnids), "--limit", "2",
                               "--method", "tome", "--points", "1", "--out", str(tmp_path / "out")]),
                "NaN", "blocks.3.mlp.fc1.weight")


# ----------------------------------------------------------------------------- 5: one error line

def test_train_and_calibrate_reject_an_unsupported_family_the_same_way(capsys, tmp_path, few_images, sample_wnids):
    common = ["--model", "levit_128s", "--images", str(few_images), "--wnids", str(sample_wnids)]
    train = _error_line(*_run(capsys, ["train", *common, "--out", str(tmp_path / "run")]),
                        "dynamicvit", "levit", "vit, convnext, swin")
    calibrate = _error_line(*_run(capsys, ["calibrate", *common, "--out", str(tmp_path / "p.safetensors")]))
    assert train == calibrate


def test_train_device_cuda_without_cuda(capsys, tmp_path, few_images, sample_wnids, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cli, "load_model", _never)
    _error_line(*_run(capsys, ["train", "--model", "test_vit", "--images", str(few_images), "--wnids",
                               str(sample_wnids), "--out", str(tmp_path / "run"), "--device", "cuda"]),
                "'cuda'", "CUDA is not available")


def test_train_class_list_longer_than_the_head(capsys, tmp_path, few_images, sample_wnids):
    wnids = tmp_path / "wnids_1001.txt"
    wnids.write_text(sample_wnids.read_text() + "n99999999 extra class\n")
    _error_line(*_run(capsys, ["train", "--model", "test_vit", "--images", str(few_images), "--wnids", str(wnids),
                               "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2"]),
                "1001 classes", "1000 outputs", "wnids_1001.txt")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_class_count_check_allows_a_shorter_list(few_images, sample_wnids):
    check_class_count(ImageNetFolder(few_images, sample_wnids), timm.create_model("test_vit"))  # 1000 <= 1000
    with pytest.raises(TokenSparseError, match="has 1000 classes but the head of model 'test_vit' has 10 outputs"):
        check_class_count(ImageNetFolder(few_images, sample_wnids), timm.create_model("test_vit", num_classes=10),
                          "test_vit")


def test_viz_unsupported_format_fails_before_the_model(capsys, tmp_path, sample_images, monkeypatch):
    monkeypatch.setattr(cli, "load_model", _never)
    photo = min(sample_images.iterdir())
    _error_line(*_run(capsys, ["viz", "--model", "vit_tiny_patch16_224", "--method", "tome", "--image", str(photo),
                               "--out", str(tmp_path / "x.txt")]), "x.txt", "'.txt'", ".png", ".pdf", ".svg")
    with pytest.raises(TokenSparseError, match="'.txt' is not an image format"):
        tokensparse.viz.token_maps(timm.create_model("test_vit"), ["tome"], photo, out=tmp_path / "y.txt")


def test_viz_prints_the_path_it_wrote(capsys, tmp_path, sample_images, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    photo = min(sample_images.iterdir())
    code, out, err = _run(capsys, ["viz", "--model", "test_vit", "--method", "tome:r=2", "--image", str(photo),
                                   "--out", str(tmp_path / "maps")])
    assert code == 0, err
    written = tmp_path / "maps.png"
    assert f"wrote {written}" in " ".join(out.split()) and not (tmp_path / "maps").exists()
    with Image.open(written) as img:
        assert img.format == "PNG"
    assert figure_path(tmp_path / "m.PDF") == tmp_path / "m.PDF" and figure_path("a.b/maps") == Path("a.b/maps.png")


def test_bench_device_meta(capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_model", _never)
    _error_line(*_run(capsys, FAST + ["--device", "meta", "--method", "tome"]), "'meta'", "cpu")
    with pytest.raises(TokenSparseError, match="'meta' holds no data"):
        compare_throughput({"m": timm.create_model("test_vit")}, batch_size=1, runs=1, warmup=0, device="meta")


def test_corrupt_image_with_loader_workers_is_one_line_or_skipped(capsys, tmp_path, corrupt_images, sample_wnids):
    """Read in a loader worker, a corrupt image is one clear line; ``train`` leaves it out before
    any work and says so in its summary."""
    folder, bad = corrupt_images
    dataset = ImageNetFolder(folder, sample_wnids)
    with pytest.raises(TokenSparseError) as err:
        for _ in DataLoader(dataset, num_workers=1, collate_fn=list):
            pass
    assert "Traceback" in str(err.value)  # what torch makes of a worker's error ...
    message = worker_error_message(err.value)  # ... and ours
    assert message.startswith(f"cannot read image {str(bad)!r}: ") and "\n" not in message
    code, out, err_text = _run(capsys, ["train", "--model", "test_vit", "--images", str(folder), "--wnids",
                                        str(sample_wnids), "--out", str(tmp_path / "run"), "--workers", "1",
                                        "--epochs", "1", "--batch-size", "2", "--max-steps", "1"])
    assert code == 0, out + err_text
    summary = " ".join(out.split())
    assert f"trained on {len(dataset) - 1} images; skipped 1 unreadable image" in summary, out
    assert bad.name in "".join(out.split()) and "Traceback" not in out + err_text  # rich wraps long paths


@pytest.mark.parametrize("model_name, method, size", [
    *[("vit_tiny_patch16_224", m, 224) for m in METHODS],
    ("levit_128s", "evovit", 224),
    ("convnext_atto", "dynamicvit", 64),
])
def test_gradient_checkpointing_on_a_patched_model_is_refused(model_name, method, size):
    model = tokensparse.patch(timm.create_model(model_name, **({"depth": 4} if model_name.startswith("vit_") else {})), method)
    with pytest.raises(TokenSparseError, match=f"gradient checkpointing cannot be used on a model patched with '{method}'"):
        model.set_grad_checkpointing(True)
    model.set_grad_checkpointing(False)  # disabling stays allowed
    for module in model.modules():  # switched on behind the API's back: the forward pass refuses
        if hasattr(module, "grad_checkpointing"):
            module.grad_checkpointing = True
    with pytest.raises(TokenSparseError, match="gradient checkpointing cannot be used"):
        model.train()(torch.randn(2, 3, size, size)).sum().backward()
    for module in model.modules():
        if hasattr(module, "grad_checkpointing"):
            module.grad_checkpointing = False
    tokensparse.unpatch(model).set_grad_checkpointing(True)  # the original model takes it again
    assert any(getattr(m, "grad_checkpointing", False) for m in model.modules())


# ----------------------------------------------------------------------------- 6: outputs and inputs first

@pytest.mark.parametrize("target", ["under_a_file", "a_folder"])
def test_bench_unwritable_json_fails_before_loading(capsys, tmp_path, monkeypatch, target):
    monkeypatch.setattr(cli, "load_model", _never)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    path, named = (tmp_path / "file" / "bench.json", tmp_path / "file") if target == "under_a_file" else \
        (tmp_path / "dir", tmp_path / "dir")
    _error_line(*_run(capsys, FAST + ["--method", "tome", "--json", str(path)]), "cannot write", repr(str(named)))


def test_sweep_and_viz_unwritable_outputs_fail_before_loading(capsys, tmp_path, sample_images, monkeypatch):
    monkeypatch.setattr(cli, "load_model", _never)
    (tmp_path / "file").write_text("x")
    _error_line(*_run(capsys, ["sweep", "--model", "vit_tiny_patch16_224", "--method", "tome",
                               "--out", str(tmp_path / "file")]), "cannot write", "it is a file")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sweep.csv").mkdir()
    _error_line(*_run(capsys, ["sweep", "--model", "vit_tiny_patch16_224", "--method", "tome",
                               "--out", str(tmp_path / "out")]), "sweep.csv", "it is a folder")
    photo = min(sample_images.iterdir())
    _error_line(*_run(capsys, ["viz", "--model", "vit_tiny_patch16_224", "--method", "tome", "--image", str(photo),
                               "--out", str(tmp_path / "file" / "maps.png")]), "cannot write", "file")


def test_bench_unreadable_image_fails_before_timing(capsys, corrupt_images, sample_wnids, vit_tiny_weights,
                                                     monkeypatch):
    monkeypatch.setattr(compare, "timed_runs", _never)
    monkeypatch.setattr(compare, "gmacs", _never)
    folder, bad = corrupt_images
    _error_line(*_run(capsys, ["bench", "--model", VIT_TINY, "--weights", str(vit_tiny_weights), "--images",
                               str(folder), "--wnids", str(sample_wnids), "--method", "tome", "--runs", "1"]),
                f"cannot read image {str(bad)!r}")


def test_scan_images_names_the_first_bad_file_and_counts_the_rest(tmp_path, corrupt_images):
    folder, bad = corrupt_images
    other = folder / "n01440764_zzz.JPEG"
    other.write_bytes(b"not an image")
    calls = []
    with pytest.raises(TokenSparseError, match=r"0000_truncated.JPEG.*\(1 more unreadable images\)"):
        scan_images(sorted(folder.iterdir()), progress=lambda: calls.append(1))
    assert len(calls) == 5
    scan_images([p for p in sorted(folder.iterdir()) if p not in (bad, other)])


# ----------------------------------------------------------------------------- 9: random predictors

def test_bench_default_leaves_dynamicvit_out_and_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    out_json = tmp_path / "bench.json"
    code, out, err = _run(capsys, FAST + ["--json", str(out_json)])
    assert code == 0, err
    assert "dynamicvit left out" in " ".join(out.split()) and "predictors=FILE" in out
    rows = json.loads(out_json.read_text())
    assert "dynamicvit" not in [r["method"] for r in rows] and not any(r["random_predictors"] for r in rows)


def test_bench_explicit_dynamicvit_is_labelled_random(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    out_json = tmp_path / "bench.json"
    code, out, err = _run(capsys, FAST + ["--method", "dynamicvit:rho=0.7", "--method", "tome",
                                          "--json", str(out_json)])
    assert code == 0, err
    assert "(random predictors)" in out
    rows = {r["method"]: r for r in json.loads(out_json.read_text())}
    assert rows["dynamicvit:rho=0.7"]["random_predictors"] is True
    assert rows["tome"]["random_predictors"] is False and rows["none"]["random_predictors"] is False


def test_random_predictors_and_sweep_refusal(tmp_path):
    assert random_predictors("dynamicvit") and random_predictors("dynamicvit:rho=0.5")
    assert not random_predictors("dynamicvit:predictors=p.safetensors")
    assert not random_predictors("tome:r=4") and not random_predictors("none")
    with pytest.raises(TokenSparseError, match="dynamicvit:predictors=FILE"):
        tokensparse.sweep.sweep_specs(["dynamicvit"])
    with pytest.raises(TokenSparseError, match="dynamicvit:predictors=FILE"):
        tokensparse.sweep.sweep_specs(["dynamicvit:gumbel=false"])


def test_sweep_cli_dynamicvit_without_predictors(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "load_model", _never)
    _error_line(*_run(capsys, ["sweep", "--model", "vit_tiny_patch16_224", "--method", "dynamicvit",
                               "--out", str(tmp_path)]), "dynamicvit:predictors=FILE", "calibrate")


def test_bench_default_on_convnext_needs_a_method(capsys):
    _error_line(*_run(capsys, ["bench", "--model", "convnext_atto", "--runs", "1"]),
                "no training-free method supports convnext", "dynamicvit:predictors=FILE")


# ----------------------------------------------------------------------------- 10: small ones

def test_spec_duplicate_keys_and_quoting():
    with pytest.raises(TokenSparseError, match="'r' is given twice in method spec 'tome:r=4,r=8'"):
        parse_spec("tome:r=4,r=8")
    with pytest.raises(TokenSparseError, match="unclosed quote"):
        parse_spec('dynamicvit:predictors="a,b')
    _, options = parse_spec('dynamicvit:predictors="runs/a,b [1].safetensors",rho=0.7')
    assert options == {"predictors": "runs/a,b [1].safetensors", "rho": 0.7}
    assert parse_spec("x:p='[1,2]',q=\"3\"")[1] == {"p": "[1,2]", "q": "3"}
    assert parse_spec("x:p=/home/o'brien/p.safetensors")[1] == {"p": "/home/o'brien/p.safetensors"}
    for opts in [options, {"p": "[1,2]", "q": "3"}, {"p": "o'b"}, {"stages": [4, 8], "s": "plain"}]:
        assert parse_spec(format_spec("x", opts)) == ("x", opts)
    assert format_spec("tome", {"r": 4}) == "tome:r=4"


def test_predictors_path_with_a_comma(capsys, tmp_path):
    model = tokensparse.patch(timm.create_model("vit_tiny_patch16_224"), "dynamicvit")
    path = save_predictors(model, tmp_path / "a,b.safetensors")
    patched = tokensparse.patch(timm.create_model("vit_tiny_patch16_224"), f'dynamicvit:predictors="{path}"')
    loaded, saved = learned_state(patched), learned_state(model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    out_json = tmp_path / "bench.json"  # the CLI writes the spec back (table, JSON) and patches with it
    code, _, err = _run(capsys, FAST + ["--method", f'dynamicvit:predictors="{path}"', "--json", str(out_json)])
    assert code == 0, err
    row = json.loads(out_json.read_text())[1]
    assert parse_spec(row["method"])[1]["predictors"] == str(path) and row["random_predictors"] is False


def test_pretrained_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:1")  # nothing listens on port 1
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(TokenSparseError, match=r"cannot download pretrained weights for 'vit_tiny_patch16_224'.*"
                                               r"127\.0\.0\.1:1.*local weights file"):
        create_model("vit_tiny_patch16_224", pretrained=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenSparseError, match="HF_HUB_OFFLINE is set"):
        create_model("vit_tiny_patch16_224", pretrained=True)
    assert time.perf_counter() - start < 10
    assert hub_unreachable("http://127.0.0.1:1/x") is not None


def test_pretrained_with_a_local_file_is_not_probed(vit_tiny_weights, monkeypatch):
    monkeypatch.setattr(tokensparse.models, "hub_unreachable", _never)
    model = create_model(VIT_TINY, pretrained=True, pretrained_cfg_overlay={"file": str(vit_tiny_weights)})
    assert model.pos_embed.abs().sum() > 0


def test_suggestions_for_a_prefix():
    assert "vit_tiny_patch16_224" in suggest_models("vit_tiny")
    with pytest.raises(TokenSparseError, match="did you mean: vit_tiny_patch16_224"):
        create_model("vit_tiny")


def test_does_not_fit_message_names_the_keys():
    model = timm.create_model("vit_tiny_patch16_224", depth=1)
    state = model.state_dict()
    state.pop("norm.weight")
    state.update({f"extra.{i}": torch.zeros(1) for i in range(7)})
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(state)
    text = describe_load_error(err.value)
    assert "\n" not in text and "Missing key(s) in state_dict (1): norm.weight" in text
    assert "Unexpected key(s) in state_dict (7): extra.0, extra.1" in text and "(2 more)" in text


# ----------------------------------------------------------------------------- 11: spread of the speed-up

def test_timed_runs_and_speedup_range():
    models = {"none": timm.create_model("test_vit"), "tome": tokensparse.patch(timm.create_model("test_vit"), "tome")}
    times = timed_runs(models, batch_size=1, runs=3, warmup=0)
    assert set(times) == {"none", "tome"} and all(len(t) == 3 and min(t) > 0 for t in times.values())
    assert isinstance(compare_throughput(models, batch_size=1, runs=1, warmup=0)["tome"], float)  # unchanged type
    assert speedup_range({"none": [1.0, 2.0, 3.0], "m": [0.5, 1.6, 2.0]}, "none", "m") == (1.25, 2.0)
    assert speedup_range({"none": [1.0, 2.0]}, "none", "none") == (1.0, 1.0)


def test_measure_variants_reports_the_range():
    models = {"none": timm.create_model("test_vit"), "tome": tokensparse.patch(timm.create_model("test_vit"), "tome")}
    res = measure_variants(models, "none", batch_size=1, runs=3, warmup=0, progress=False)
    assert res["none"]["speedup_low"] == res["none"]["speedup_high"] == res["none"]["speedup"] == 1.0
    assert res["tome"]["speedup_low"] <= res["tome"]["speedup"] <= res["tome"]["speedup_high"]
    assert wide_spread({"speedup": 1.5, "speedup_low": 1.3, "speedup_high": 1.5})
    assert not wide_spread({"speedup": 1.5, "speedup_low": 1.45, "speedup_high": 1.55})


@pytest.mark.parametrize("tome_times, warned", [([1.0, 0.5, 0.6], True), ([0.50, 0.52, 0.51], False)])
def test_bench_shows_the_range_and_warns_when_wide(capsys, tmp_path, monkeypatch, tome_times, warned):
    def fake_timed_runs(models, batch_size, **kw):
        return {"none": [1.0, 1.0, 1.0], "tome": list(tome_times)}

    monkeypatch.setattr(compare, "timed_runs", fake_timed_runs)
    monkeypatch.setenv("COLUMNS", "250")
    out_json = tmp_path / "bench.json"
    code, out, err = _run(capsys, FAST + ["--method", "tome", "--json", str(out_json)])
    assert code == 0, err
    tome = json.loads(out_json.read_text())[1]
    assert tome["speedup_low"] == pytest.approx(min(1 / t for t in tome_times))
    assert tome["speedup_high"] == pytest.approx(max(1 / t for t in tome_times))
    assert f"{tome['speedup_low']:.2f}-{tome['speedup_high']:.2f}" in out and "range" in out
    assert ("warning: speed-ups varied by more than 10%" in " ".join(out.split())) == warned

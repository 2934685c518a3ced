"""transformers models from the command line (``--model hf:PATH``), their preprocessing from the
saved image processor, and DynamicViT calibration / training on them.

The CLI runs use a tiny random ``ViTForImageClassification`` (1000 labels, so the shared
ImageNet images can be scored) saved with an image processor; the preprocessing test uses
the real ViT-Tiny weights converted from timm.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import transformers as T
from conftest import VIT_TINY
from PIL import Image
from torch.utils.data import TensorDataset

import tokensparse
from tokensparse import TokenSparseError
from tokensparse.cli import main
from tokensparse.data import data_config, image_dataset, model_transform
from tokensparse.families import get_family
from tokensparse.families.hf import processor_data_config
from tokensparse.families.hf_convert import image_processor_from_timm, vit_from_timm
from tokensparse.models import create_model
from tokensparse.train.calibrate import CalibrateConfig, calibrate_dynamicvit
from tokensparse.train.finetune import TrainConfig, finetune_dynamicvit

CFG = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64,
       "image_size": 32, "patch_size": 8}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random ViTForImageClassification with 1000 labels and a ViTImageProcessor, saved."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf-vit")
    T.ViTForImageClassification(T.ViTConfig(**CFG, num_labels=1000)).save_pretrained(out)
    T.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                        resample=3).save_pretrained(out)
    return out


def _ok(capsys, argv: list[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, out + err
    return out


def test_bench_reads_the_processor_and_measures_accuracy(hf_dir, sample_images, tmp_path, capsys):
    report = tmp_path / "bench.json"
    _ok(capsys, ["bench", "--model", f"hf:{hf_dir}", "--images", str(sample_images), "--limit", "8",
                 "--method", "tome:r=2", "--method", "evit", "--batch-size", "4", "--runs", "1", "--warmup", "0",
                 "--json", str(report)])
    rows = {r["method"]: r for r in json.loads(report.read_text())}
    assert set(rows) == {"none", "tome:r=2", "evit"}
    assert rows["none"]["agreement"] == 100.0 and rows["tome:r=2"]["top1"] is not None
    assert rows["tome:r=2"]["gmacs"] < rows["none"]["gmacs"]


def test_sweep_viz_calibrate_train(hf_dir, sample_images, tmp_path, capsys):
    model = f"hf:{hf_dir}"
    _ok(capsys, ["sweep", "--model", model, "--images", str(sample_images), "--limit", "4", "--method", "tome",
                 "--points", "2", "--batch-size", "4", "--runs", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 4  # header, unreduced, two points
    image = min(sample_images.iterdir())
    _ok(capsys, ["viz", "--model", model, "--image", str(image), "--method", "evit", "--out", str(tmp_path / "m.png")])
    assert (tmp_path / "m.png").stat().st_size > 0
    predictors = tmp_path / "p.safetensors"
    _ok(capsys, ["calibrate", "--model", model, "--images", str(sample_images), "--limit", "8", "--method",
                 "dynamicvit:rho=0.7,locations=[1,2]", "--epochs", "1", "--imitation-epochs", "1", "--batch-size",
                 "4", "--out", str(predictors)])
    patched = tokensparse.patch(create_model(model), f"dynamicvit:rho=0.7,locations=[1,2],predictors={predictors}")
    with torch.no_grad():
        assert patched(torch.randn(2, 3, 32, 32)).logits.shape == (2, 1000)
    _ok(capsys, ["train", "--model", model, "--images", str(sample_images), "--limit", "8", "--method",
                 "dynamicvit:rho=0.7,locations=[1,2]", "--epochs", "1", "--batch-size", "4", "--out",
                 str(tmp_path / "run")])
    assert (tmp_path / "run" / "predictors.safetensors").is_file()


def test_hf_model_errors(hf_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv, fragment in (
            (["bench", "--model", f"hf:{tmp_path / 'missing'}"], "no such folder"),
            (["bench", "--model", "hf:"], "after 'hf:'"),
            (["bench", "--model", f"hf:{hf_dir}", "--weights", str(tmp_path / "w.pth")], "loads its own weights")):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert fragment in err and "Traceback" not in out + err, err
    bare = tmp_path / "no-processor"
    T.ViTForImageClassification(T.ViTConfig(**CFG)).save_pretrained(bare)
    with pytest.raises(TokenSparseError, match="preprocessor_config.json"):
        data_config(create_model(f"hf:{bare}"))
    with pytest.raises(TokenSparseError, match="not loaded with from_pretrained"):
        data_config(T.ViTForImageClassification(T.ViTConfig(**CFG)))


def test_processor_settings_become_timm_data_configs():
    squash = processor_data_config({"size": {"height": 224, "width": 224}, "resample": 2, "image_mean": [0.5] * 3,
                                    "image_std": [0.5] * 3})
    assert squash == {"input_size": (3, 224, 224), "interpolation": "bilinear", "mean": (0.5,) * 3,
                      "std": (0.5,) * 3, "crop_pct": 1.0, "crop_mode": "squash"}
    clip = processor_data_config({"size": {"shortest_edge": 256}, "do_center_crop": True,
                                  "crop_size": {"height": 224, "width": 224}, "resample": 3})
    assert clip["input_size"] == (3, 224, 224) and clip["crop_mode"] == "center" and clip["crop_pct"] == 0.875
    deit = processor_data_config({"size": {"height": 256, "width": 256}, "do_center_crop": True,
                                  "crop_size": {"height": 224, "width": 224}, "resample": 3})
    assert deit["crop_mode"] == "squash" and deit["crop_pct"] == 0.875
    plain = processor_data_config({"size": {"height": 32, "width": 32}, "do_normalize": False})
    assert plain["mean"] == (0.0,) * 3 and plain["std"] == (1.0,) * 3
    for bad, fragment in (({"size": {"height": 32, "width": 32}, "do_resize": False}, "do_resize"),
                          ({"size": {"longest_edge": 32}}, "size"),
                          ({"size": {"height": 32, "width": 32}, "rescale_factor": 1.0}, "rescale"),
                          ({"size": {"height": 32, "width": 32}, "resample": 9}, "resample")):
        with pytest.raises(TokenSparseError, match=fragment):
            processor_data_config(bad)


def test_converted_processor_preprocesses_like_timm(vit_tiny_weights, sample_images, sample_wnids, tmp_path):
    tm = timm.create_model(VIT_TINY, pretrained=True, pretrained_cfg_overlay={"file": str(vit_tiny_weights)})
    vit_from_timm(tm).save_pretrained(tmp_path)
    image_processor_from_timm(tm).save_pretrained(tmp_path)
    hf = create_model(f"hf:{tmp_path}")
    assert type(hf).__name__ == "ViTForImageClassification" and hf.config._attn_implementation == "sdpa"
    ours, theirs = model_transform(hf), model_transform(tm)
    for path in sorted(sample_images.iterdir())[:5]:
        img = Image.open(path).convert("RGB")
        assert torch.equal(ours(img), theirs(img))
    # the dataset of a transformers model uses its own preprocessing
    assert image_dataset(sample_images, hf, sample_wnids, training=False, limit=1)[0][0].shape == (3, 224, 224)


@pytest.mark.parametrize("cls", [T.ViTForImageClassification, T.DeiTForImageClassificationWithTeacher,
                                 T.Dinov2ForImageClassification, T.CLIPForImageClassification])
def test_forward_head_gives_the_models_logits(cls):
    torch.manual_seed(0)
    if cls is T.CLIPForImageClassification:
        vision = dict(CFG)
        config = T.CLIPConfig(vision_config=vision, text_config={"hidden_size": 32, "num_hidden_layers": 1,
                                                                 "num_attention_heads": 2, "intermediate_size": 64},
                              num_labels=5)
    elif cls is T.Dinov2ForImageClassification:
        config = T.Dinov2Config(**{k: v for k, v in CFG.items() if k != "intermediate_size"}, mlp_ratio=2,
                                num_labels=5)
    else:
        config = (T.DeiTConfig if "DeiT" in cls.__name__ else T.ViTConfig)(**CFG, num_labels=5)
    model = cls(config).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for spec in (None, "tome:r=3"):
            if spec:
                tokensparse.patch(model, spec)
            family = get_family(model)
            assert family.has_head
            ref = model(x).logits
            assert (family.forward_head(family.forward_features(x)) - ref).abs().max() <= 1e-5
    tokensparse.unpatch(model)


def test_feature_models_calibrate_on_tokens_and_refuse_training(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))
    method = "dynamicvit:rho=0.7,locations=[1,2]"
    model = T.ViTModel(T.ViTConfig(**CFG)).eval()
    assert not get_family(model).has_head
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate_dynamicvit(model, data, method, CalibrateConfig(epochs=1, imitation_epochs=1, batch_size=4),
                         progress=False)
    assert tokensparse.is_patched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)  # backbone frozen
    with pytest.raises(TokenSparseError, match="token_weight must be > 0"):
        calibrate_dynamicvit(T.ViTModel(T.ViTConfig(**CFG)), data, method,
                             CalibrateConfig(epochs=1, token_weight=0.0), progress=False)
    with pytest.raises(TokenSparseError, match="no classification head"):
        finetune_dynamicvit(T.ViTModel(T.ViTConfig(**CFG)), data, tmp_path, method, TrainConfig(epochs=1),
                            progress=False)

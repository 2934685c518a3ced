"""tokensparse.models.create_model: names, local weights files and their errors."""
from __future__ import annotations

import pytest
import timm
import timm.data
import torch
from safetensors.torch import save_file

from tokensparse.errors import TokenSparseError
from tokensparse.models import create_model

VIT_TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def test_real_weights_and_data_config(vit_tiny_weights):
    model = create_model(VIT_TINY, weights=vit_tiny_weights)
    assert not model.training
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
    assert cfg["input_size"] == (3, 224, 224)


def test_same_as_timm_pretrained_file(vit_tiny_weights):
    ours = create_model(VIT_TINY, weights=str(vit_tiny_weights))
    theirs = timm.create_model(VIT_TINY, pretrained=True,
                               pretrained_cfg_overlay={"file": str(vit_tiny_weights)})
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), k


def test_unknown_model_suggests_close_names():
    with pytest.raises(TokenSparseError, match="unknown model 'vit_tiny_patch16_22'.*"
                                               "vit_tiny_patch16_224"):
        create_model("vit_tiny_patch16_22")


def test_unknown_pretrained_tag():
    with pytest.raises(TokenSparseError, match="no pretrained tag 'nope'.*augreg"):
        create_model("vit_tiny_patch16_224.nope")


def test_bad_model_kwarg():
    with pytest.raises(TokenSparseError, match="bad option"):
        create_model("vit_tiny_patch16_224", no_such_option=3)


def test_weights_and_pretrained_exclusive(tmp_path):
    with pytest.raises(TokenSparseError, match="not both"):
        create_model("vit_tiny_patch16_224", weights=tmp_path / "w.pth", pretrained=True)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(TokenSparseError, match="absent.safetensors.*not found"):
        create_model("vit_tiny_patch16_224", weights=path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(TokenSparseError, match="could not read weights file .*garbage"):
        create_model("vit_tiny_patch16_224", weights=path)


def test_truncated_safetensors(tmp_path, vit_tiny_weights):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(vit_tiny_weights.read_bytes()[:100_000])
    with pytest.raises(TokenSparseError, match="truncated.safetensors"):
        create_model(VIT_TINY, weights=path)


def test_torch_checkpoint_with_model_key(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", depth=2)
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in src.state_dict().items()}},
               path)
    model = create_model("vit_tiny_patch16_224", weights=path, depth=2)
    assert torch.equal(model.pos_embed, src.pos_embed)


def test_mismatched_weights_name_keys_and_shapes(tmp_path):
    path = tmp_path / "deit_tiny.safetensors"
    save_file(timm.create_model("deit_tiny_patch16_224", depth=2).state_dict(), str(path))
    with pytest.raises(TokenSparseError) as err:
        create_model("vit_small_patch16_224", weights=path, depth=3)
    msg = str(err.value)
    assert "deit_tiny.safetensors" in msg and "vit_small_patch16_224" in msg
    assert "missing keys (blocks.2." in msg
    assert "shape mismatch" in msg and "(192,) vs model (384,)" in msg


def test_unexpected_keys(tmp_path):
    state = timm.create_model("vit_tiny_patch16_224", depth=2).state_dict()
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.safetensors"
    save_file(state, str(path))
    with pytest.raises(TokenSparseError, match=r"1 unexpected keys \(extra.weight\)"):
        create_model("vit_tiny_patch16_224", weights=path, depth=2)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(TokenSparseError, match="holds no state dict"):
        create_model("vit_tiny_patch16_224", weights=path)

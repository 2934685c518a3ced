"""tokensparse.measure: FLOPs, interleaved throughput, ImageNet folders and accuracy."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from tokensparse.errors import TokenSparseError
from tokensparse.measure import ImageNetFolder, compare_throughput, count_flops, evaluate, evaluate_many, gmacs
from tokensparse.measure.flops import attention_flop_mapping
from tokensparse.models import create_model

VIT_TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
WNIDS = ["n01440764", "n01443537", "n01484850"]


def _vit_tiny(**kw) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", **kw)


def _vit_macs(dim=192, depth=12, mlp=768, tokens=197, patches=196, classes=1000) -> int:
    """Analytic MACs of a timm ViT: patch embed, qkv/proj/mlp linears, attention, head."""
    patch_embed = patches * (3 * 16 * 16) * dim
    linears = tokens * dim * (3 * dim + dim + 2 * mlp)
    attention = 2 * tokens * tokens * dim  # Q K^T and attn @ V over all heads
    return patch_embed + depth * (linears + attention) + dim * classes


# ----------------------------------------------------------------------------- FLOPs

def test_gmacs_matches_analytic_count():
    model = _vit_tiny()
    assert model.training
    measured = gmacs(model)
    assert model.training, "previous train mode restored"
    assert measured == pytest.approx(_vit_macs() / 1e9, rel=0.01)


def test_gmacs_counts_attention_and_is_per_image():
    model = _vit_tiny(depth=2).eval()
    without_attention = (_vit_macs(depth=2) - 2 * 2 * 197 * 197 * 192) / 1e9
    assert gmacs(model) > without_attention * 1.05
    assert gmacs(model, batch_size=3) == pytest.approx(gmacs(model), rel=1e-6)
    assert gmacs(model, input_size=(3, 224, 224)) == pytest.approx(gmacs(model))


def test_attention_mapping_covers_cpu_kernel():
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in attention_flop_mapping()


def test_count_flops_plain_sdpa():
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 4)

    class Attn(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    assert count_flops(Attn(), q) == 2 * 2 * 3 * 10 * 12 * (8 + 4)


def test_gmacs_bad_input_size():
    with pytest.raises(TokenSparseError, match="input_size"):
        gmacs(_vit_tiny(depth=1), input_size=(224, 224))


# ----------------------------------------------------------------------------- speed

def test_compare_throughput_two_models():
    models = {"deep": _vit_tiny(depth=4), "shallow": _vit_tiny(depth=1)}
    threads = torch.get_num_threads()
    calls = []
    speed = compare_throughput(models, batch_size=2, runs=2, warmup=1, threads=1,
                               progress=lambda done, total: calls.append((done, total)))
    assert set(speed) == {"deep", "shallow"}
    assert all(v > 0 for v in speed.values())
    assert torch.get_num_threads() == threads
    assert calls[-1] == (6, 6)
    assert models["deep"].training, "previous train mode restored"


def test_compare_throughput_bf16():
    speed = compare_throughput({"m": _vit_tiny(depth=1)}, batch_size=1, runs=1, warmup=0,
                               dtype="bf16")
    assert speed["m"] > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "fp16"}, "dtype"), ({"runs": 0}, "runs"), ({"batch_size": 0}, "batch_size"),
    ({"device": "nonsense"}, "device"), ({"threads": 0}, "threads"),
])
def test_compare_throughput_bad_arguments(kwargs, match):
    with pytest.raises(TokenSparseError, match=match):
        compare_throughput({"m": _vit_tiny(depth=1)}, **kwargs)


# ----------------------------------------------------------------------------- dataset

def _image(path: Path, color=(200, 30, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), color).save(path, format=fmt)
    return path


def _wnids_file(path: Path, wnids=WNIDS) -> Path:
    path.write_text("".join(f"{w} class {i}\n" for i, w in enumerate(wnids)))
    return path


@pytest.fixture
def flat_dir(tmp_path) -> Path:
    root = tmp_path / "flat"
    _image(root / f"{WNIDS[2]}_b.JPEG", fmt="JPEG")
    _image(root / f"{WNIDS[0]}_a.jpg")
    _image(root / f"{WNIDS[1]}_c.PNG", fmt="PNG")
    (root / "README.txt").write_text("not an image")
    return root


@pytest.fixture
def folder_dir(tmp_path) -> Path:
    root = tmp_path / "folders"
    _image(root / WNIDS[1] / "x.JPEG", fmt="JPEG")
    _image(root / WNIDS[0] / "y.jpeg", fmt="JPEG")
    _image(root / WNIDS[0] / "z.png")
    return root


def test_flat_layout(flat_dir, tmp_path):
    ds = ImageNetFolder(flat_dir, _wnids_file(tmp_path / "w.txt"))
    assert len(ds) == 3 and ds.classes == WNIDS
    assert sorted(ds.targets) == [0, 1, 2]
    img, target = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert target == ds.class_to_idx[ds.samples[0][0].name.split("_")[0]]


def test_folder_layout_without_wnids(folder_dir):
    ds = ImageNetFolder(folder_dir, transform=lambda im: im.size)
    assert ds.classes == [WNIDS[0], WNIDS[1]]
    assert ds.targets == [0, 0, 1]
    assert ds[0] == ((20, 16), 0)


def test_folder_layout_with_wnids(folder_dir, tmp_path):
    ds = ImageNetFolder(folder_dir, _wnids_file(tmp_path / "w.txt", list(reversed(WNIDS))))
    assert ds.targets == [2, 2, 1]


def test_shared_sample_layout(sample_images, sample_wnids):
    ds = ImageNetFolder(sample_images, sample_wnids)
    assert len(ds) == 500 and len(ds.classes) == 1000
    assert sorted(ds.targets) == list(range(0, 1000, 2))


def test_missing_directory(tmp_path):
    with pytest.raises(TokenSparseError, match="image directory .*nope.* not found"):
        ImageNetFolder(tmp_path / "nope")


def test_no_images(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(TokenSparseError, match="no images found.*sub-folders.*flat files"):
        ImageNetFolder(tmp_path / "empty")


def test_wnids_missing_or_empty(flat_dir, tmp_path):
    with pytest.raises(TokenSparseError, match="wnids file .*absent.txt.* not found"):
        ImageNetFolder(flat_dir, tmp_path / "absent.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(TokenSparseError, match="empty.txt.* is empty"):
        ImageNetFolder(flat_dir, tmp_path / "empty.txt")


def test_flat_layout_needs_wnids(flat_dir):
    with pytest.raises(TokenSparseError, match="give a wnids file"):
        ImageNetFolder(flat_dir)


def test_unknown_wnid_named(flat_dir, tmp_path):
    _image(flat_dir / "n99999999_q.jpg")
    with pytest.raises(TokenSparseError, match="n99999999_q.jpg.*'n99999999'.*not in"):
        ImageNetFolder(flat_dir, _wnids_file(tmp_path / "w.txt"))


def test_flat_name_without_wnid(tmp_path):
    _image(tmp_path / "d" / "photo.jpg")
    with pytest.raises(TokenSparseError, match="photo.jpg.*<wnid>_<name>"):
        ImageNetFolder(tmp_path / "d", _wnids_file(tmp_path / "w.txt"))


def test_unreadable_image_named(flat_dir, tmp_path):
    (flat_dir / f"{WNIDS[0]}_broken.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    ds = ImageNetFolder(flat_dir, _wnids_file(tmp_path / "w.txt"))
    broken = next(i for i, (p, _) in enumerate(ds.samples) if "broken" in p.name)
    with pytest.raises(TokenSparseError, match="cannot read image .*_broken.JPEG"):
        ds[broken]


# ----------------------------------------------------------------------------- accuracy

def test_evaluate_real_weights(vit_tiny_weights, sample_images, sample_wnids):
    model = create_model(VIT_TINY, weights=vit_tiny_weights)
    res = evaluate(model, sample_images, sample_wnids, reference=model, limit=64,
                   batch_size=32, progress=False)
    assert res["n"] == 64
    assert 75.0 <= res["top1"] <= 95.0  # 87.5 on these 64; 82.6 on all 500
    assert res["top5"] >= res["top1"]
    assert res["agreement"] == 100.0


def _small_classifier(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=len(WNIDS), **kw)


def test_evaluate_many_mixed_preprocessing(flat_dir, tmp_path):
    wnids = _wnids_file(tmp_path / "w.txt")
    a = _small_classifier()
    b = _small_classifier(img_size=112)  # fails unless it gets its own 112-pixel inputs
    b.pretrained_cfg = {**b.pretrained_cfg, "input_size": (3, 112, 112),
                        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    res = evaluate_many({"a": a, "b": b, "a2": a}, flat_dir, wnids, reference_key="a",
                        batch_size=2, progress=False)
    assert set(res) == {"a", "b", "a2"}
    assert res["a"]["n"] == 3 and res["a"]["agreement"] == 100.0
    assert res["a2"] == res["a"]
    assert res["b"]["top5"] == 100.0  # only 3 classes
    for r in res.values():
        assert 0.0 <= r["top1"] <= 100.0


def test_evaluate_without_reference_and_with_tensor(flat_dir, tmp_path):
    wnids = _wnids_file(tmp_path / "w.txt")
    model = _small_classifier()
    plain = evaluate(model, flat_dir, wnids, progress=False)
    assert plain["agreement"] is None and plain["n"] == 3
    same = evaluate(model, flat_dir, wnids, progress=False, limit=2,
                    reference=torch.tensor([0, 0]))
    assert same["n"] == 2 and same["agreement"] in (0.0, 50.0, 100.0)
    with pytest.raises(TokenSparseError, match="reference predictions have shape"):
        evaluate(model, flat_dir, wnids, progress=False, reference=torch.zeros(5))


def test_evaluate_errors(flat_dir, tmp_path):
    wnids = _wnids_file(tmp_path / "w.txt")
    model = _small_classifier()
    with pytest.raises(TokenSparseError, match="3 classes"):
        evaluate(_vit_tiny(depth=1), flat_dir, wnids, progress=False)
    with pytest.raises(TokenSparseError, match="reference 'x' is not one of"):
        evaluate_many({"m": model}, flat_dir, wnids, reference_key="x", progress=False)
    with pytest.raises(TokenSparseError, match="limit"):
        evaluate(model, flat_dir, wnids, limit=0, progress=False)


def test_unreadable_image_in_worker_is_one_line(flat_dir, tmp_path):
    (flat_dir / f"{WNIDS[0]}_broken.JPEG").write_bytes(b"garbage")
    with pytest.raises(TokenSparseError) as err:
        evaluate(_small_classifier(), flat_dir, _wnids_file(tmp_path / "w.txt"),
                 num_workers=1, progress=False)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("cannot read image") and "_broken.JPEG" in str(err.value)

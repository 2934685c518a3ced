"""Token maps (``tokensparse.viz``) and accuracy/speed sweeps (``tokensparse.sweep``)."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import tokensparse
from tokensparse.cli import main
from tokensparse.models import create_model
from tokensparse.state import LocationInfo
from tokensparse.sweep import GRIDS, SweepRow, pick, plot_sweep, read_csv, sweep_specs, write_csv
from tokensparse.viz import DIM_FACTOR, DPI, token_map, token_maps

VIT_TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
CSV_COLUMNS = ["method", "spec", "knob", "value", "gmacs", "img_per_s", "speedup", "top1",
               "top5", "agreement", "cosine"]


@pytest.fixture(scope="module")
def small_vit() -> torch.nn.Module:
    """A random-init depth-4 ViT-Tiny (fast)."""
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", depth=4)


@pytest.fixture()
def photo(tmp_path: Path) -> Path:
    """A small colourful JPEG."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(180, 240, 3), dtype=np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(arr).save(path)
    return path


def _records(model: torch.nn.Module, spec: str) -> list[LocationInfo]:
    import copy
    patched = tokensparse.patch(copy.deepcopy(model), spec)
    with torch.inference_mode():
        patched(torch.randn(2, 3, 224, 224))
    return tokensparse.location_records(patched)


def _patches(arr: np.ndarray, grid: int = 14) -> np.ndarray:
    """``(grid, grid, p, p, 3)`` blocks of an ``(H, W, 3)`` array."""
    p = arr.shape[0] // grid
    return arr.reshape(grid, p, grid, p, 3).transpose(0, 2, 1, 3, 4)


def _colourful(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.uniform(0.05, 0.95, size=(224, 224, 3))
    img[..., 0] = np.clip(img[..., 1] + 0.04, 0, 1)  # never grey (R != G everywhere)
    return img


def test_greyed_patches_are_exactly_the_dropped_ones(small_vit):
    image = _colourful()
    for loc in _records(small_vit, "topk:keep_rate=0.5"):
        for b in range(2):
            out = _patches(token_map(image, loc, (14, 14), index=b))
            grey = np.all(np.isclose(out[..., 0], out[..., 1]) & np.isclose(out[..., 1], out[..., 2]),
                          axis=(2, 3))
            dropped = (loc.patch_to_token[b] < 0).numpy().reshape(14, 14)
            assert dropped.any() and not dropped.all()
            np.testing.assert_array_equal(grey, dropped)
            kept = _patches(image.astype(np.float32))[~dropped]
            np.testing.assert_allclose(out[~dropped], kept, atol=1e-6)  # kept: untouched


def test_tome_groups_have_consistent_tints(small_vit):
    image = np.full((224, 224, 3), 0.5)
    loc = _records(small_vit, "tome:r=40")[-1]
    out = _patches(token_map(image, loc, (14, 14)))
    p2t = loc.patch_to_token[0].numpy().reshape(14, 14)
    size = loc.size[0].numpy()
    centre = out[:, :, 8, 8]  # interior pixel of each patch (no outline)
    merged_tokens = [t for t in np.unique(p2t) if t >= 0 and size[t] > 1]
    assert len(merged_tokens) >= 2
    tints = {}
    for t in merged_tokens:
        colours = centre[p2t == t]
        np.testing.assert_allclose(colours, colours[:1].repeat(len(colours), 0), atol=1e-6)
        assert not np.allclose(colours[0], 0.5)
        tints[t] = tuple(np.round(colours[0], 4))
    assert len(set(tints.values())) > 1  # different groups, different tints
    singles = np.isin(p2t, [t for t in np.unique(p2t) if t >= 0 and size[t] == 1])
    np.testing.assert_allclose(out[singles], 0.5, atol=1e-6)


def test_mask_record_dims_the_unmarked_patches():
    image = _colourful()
    informative = torch.zeros(1, 196, dtype=torch.bool)
    informative[0, :50] = True
    loc = LocationInfo(block=4, num_prefix=1, size=torch.ones(1, 197),
                       patch_to_token=torch.arange(1, 197).unsqueeze(0),
                       extra={"informative": informative})
    out = _patches(token_map(image, loc, (14, 14)))
    src = _patches(image.astype(np.float32))
    mask = informative[0].numpy().reshape(14, 14)
    np.testing.assert_allclose(out[mask], src[mask], atol=1e-6)
    np.testing.assert_allclose(out[~mask], src[~mask] * DIM_FACTOR, atol=1e-6)


def test_token_maps_figure_png(small_vit, photo, tmp_path):
    out = tmp_path / "maps.png"
    fig = token_maps(small_vit, ["topk:keep_rate=0.5", "tome:r=8"], photo, out=out)
    assert len(fig.axes) == 2 * (1 + 4)  # tome: a location per block, 4 blocks
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        w, h = fig.get_size_inches() * DPI
        assert img.size == (round(w), round(h))


def test_sweep_grid_selection():
    assert pick([1, 2, 3, 4, 5], 3) == [1, 3, 5]
    assert pick([1, 2, 3], None) == [1, 2, 3]
    rows = sweep_specs(["tome"], points=2)
    assert [r.spec for r in rows] == ["none", "tome:r=4", "tome:r=16"]
    assert {r.method for r in sweep_specs()} >= {"none", "topk", "evit", "tome"}
    assert set(GRIDS) >= {"topk", "evit", "tome"}
    with pytest.raises(tokensparse.TokenSparseError, match="unknown method"):
        sweep_specs(["nope"])


def test_plot_sweep_png(tmp_path):
    rows = [SweepRow("none", "none", gmacs=1.0, speedup=1.0, top1=80.0, agreement=100.0)]
    rows += [SweepRow("tome", f"tome:r={r}", "r", float(r), gmacs=1 - r / 20, speedup=1 + r / 10,
                      top1=80.0 - r, agreement=100.0 - 2 * r) for r in (4, 8)]
    fig = plot_sweep(rows, tmp_path / "sweep.png")
    assert len(fig.axes) == 2
    with Image.open(tmp_path / "sweep.png") as img:
        assert img.format == "PNG"
        w, h = fig.get_size_inches() * DPI
        assert img.size == (round(w), round(h))
    write_csv(rows, tmp_path / "sweep.csv")
    with open(tmp_path / "sweep.csv", newline="") as f:
        assert next(csv.reader(f)) == CSV_COLUMNS  # every field, in the CSV's own order
    again = read_csv(tmp_path / "sweep.csv")
    assert again == rows
    fig = plot_sweep(again, tmp_path / "gmacs.png", x="gmacs")
    assert fig.axes[0].get_xlabel().startswith("GMACs reduction")
    with pytest.raises(tokensparse.TokenSparseError, match="x axis"):
        plot_sweep(rows, x="nope")


def test_cli_viz(capsys, photo, tmp_path):
    out = tmp_path / "v.png"
    code = main(["viz", "--model", "vit_tiny_patch16_224", "--method", "evit",
                 "--image", str(photo), "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1]


@pytest.mark.parametrize("argv,fragment", [
    (["--method", "evit", "--image", "missing.jpg"], "image file not found"),
    (["--method", "nope"], "unknown method 'nope'"),
])
def test_cli_viz_bad_input(capsys, photo, tmp_path, argv, fragment):
    argv = ["viz", "--model", "vit_tiny_patch16_224", "--out", str(tmp_path / "x.png")] + argv
    if "--image" not in argv:
        argv += ["--image", str(photo)]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in out + err
    assert err.startswith("error: ") and fragment in err, err


def test_cli_sweep(capsys, tmp_path, vit_tiny_weights, images_dir, wnids_file):
    code = main(["sweep", "--model", VIT_TINY, "--weights", str(vit_tiny_weights),
                 "--images", str(images_dir), "--wnids", str(wnids_file), "--limit", "4",
                 "--method", "tome", "--points", "1", "--runs", "1", "--warmup", "0",
                 "--batch-size", "4", "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 0, err
    with open(tmp_path / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["spec"] for r in rows] == ["none", "tome:r=12"]
    assert float(rows[0]["speedup"]) == 1.0 and float(rows[0]["agreement"]) == 100.0
    assert float(rows[1]["gmacs"]) < float(rows[0]["gmacs"])
    with Image.open(tmp_path / "sweep.png") as img:
        assert img.format == "PNG"


def test_cli_sweep_unknown_method(capsys, tmp_path):
    code = main(["sweep", "--model", "vit_tiny_patch16_224", "--method", "nope",
                 "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 2 and "unknown method 'nope'" in err


def test_spatial_maps_dim_exactly_the_fast_positions():
    """ConvNeXt: the third stage's 14 x 14 positions; slow ones as they are, fast ones dimmed."""
    from tokensparse.viz import location_grid, location_title
    model = create_model("convnext_tiny", depths=(1, 1, 4, 1), dims=(16, 32, 64, 128))
    patched = tokensparse.patch(model, "dynamicvit:rho=0.7")
    with torch.inference_mode():
        patched(torch.randn(1, 3, 224, 224))
    image = _colourful(2)
    src = _patches(image.astype(np.float32))
    for loc in tokensparse.location_records(patched):
        assert location_grid(loc, patched) == (14, 14)
        assert location_title(loc).startswith(f"stage 3 block {loc.block}: 196 tok")
        out = _patches(token_map(image, loc, location_grid(loc, patched)))
        slow = loc.extra["slow"][0].numpy().reshape(14, 14)
        assert slow.sum() == int(196 * {1: 0.7, 2: 0.5, 3: 0.3}[loc.block])
        np.testing.assert_allclose(out[slow], src[slow], atol=1e-6)
        np.testing.assert_allclose(out[~slow], src[~slow] * DIM_FACTOR, atol=1e-6)


def test_every_method_draws(small_vit, photo, tmp_path):
    """One figure, one row per method: token methods, Evo-ViT's informative tokens, DynamicViT's kept ones."""
    specs = ["topk:keep_rate=0.5", "evit", "tome:r=8", "ppt", "evovit", "dynamicvit"]
    fig = token_maps(small_vit, specs, photo, out=tmp_path / "all.png")
    assert [ax.get_ylabel() for ax in fig.axes[::5]] == specs
    from tokensparse.viz import display_spec
    label = display_spec("dynamicvit:predictors=/x/y/p.safetensors,rho=0.7")
    assert label.startswith("dynamicvit\n") and "p.safetensors" in label.replace("\n", "") and "/x/y" not in label
    assert all(len(line) <= 28 for line in label.splitlines())
    with Image.open(tmp_path / "all.png") as img:
        assert img.format == "PNG"


def test_sweep_fixed_options_and_training_free_default(tmp_path):
    rows = sweep_specs([f"dynamicvit:predictors={tmp_path / 'p.safetensors'}"], points=2)
    assert [r.spec for r in rows[1:]] == [f"dynamicvit:predictors={tmp_path / 'p.safetensors'},rho=0.5",
                                          f"dynamicvit:predictors={tmp_path / 'p.safetensors'},rho=0.9"]
    assert "dynamicvit" not in {r.method for r in sweep_specs()}  # needs trained predictors: only on request
    with pytest.raises(tokensparse.TokenSparseError, match="the option the sweep varies"):
        sweep_specs(["tome:r=4"])
    with pytest.raises(tokensparse.TokenSparseError, match="no training-free method"):
        sweep_specs(model=create_model("convnext_atto"))


def test_drawing_leaves_the_global_matplotlib_backend_alone(small_vit, photo, tmp_path):
    """Figures come from matplotlib's object API: no matplotlib.use, no pyplot."""
    had_pyplot = "matplotlib.pyplot" in sys.modules
    original = dict.__getitem__(matplotlib.rcParams, "backend")  # raw value: may be the auto sentinel
    matplotlib.use("svg")  # a caller's non-Agg choice
    try:
        token_maps(small_vit, ["topk:keep_rate=0.5"], photo, out=tmp_path / "maps.png")
        rows = [SweepRow("none", "none", gmacs=1.0, speedup=1.0)]
        plot_sweep(rows, tmp_path / "sweep.png")
        assert matplotlib.rcParams["backend"] == "svg"
        assert matplotlib.get_backend() == "svg"
        assert had_pyplot or "matplotlib.pyplot" not in sys.modules
        for name in ("maps.png", "sweep.png"):
            with Image.open(tmp_path / name) as img:
                assert img.format == "PNG"
    finally:
        dict.__setitem__(matplotlib.rcParams, "backend", original)

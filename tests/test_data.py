"""tokensparse.data: the three image-folder layouts, splits, and clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from tokensparse.data import (
    IMAGE_EXTENSIONS,
    UNLABELLED,
    ImageNetFolder,
    UnlabelledImages,
    image_dataset,
    is_image_file,
    split_dataset,
)
from tokensparse.errors import TokenSparseError
from tokensparse.measure import ImageNetFolder as MeasureImageNetFolder
from tokensparse.models import create_model

WNIDS = ["n01440764", "n01443537", "n01484850"]


def _image(path: Path, color=(200, 30, 30), fmt: str | None = None, size=(20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def _wnids_file(path: Path, wnids=WNIDS) -> Path:
    path.write_text("".join(f"{w} class {i}\n" for i, w in enumerate(wnids)))
    return path


def test_measure_reexports_the_same_class():
    assert MeasureImageNetFolder is ImageNetFolder


def test_extensions_are_pillow_readable_formats():
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".gif"} <= IMAGE_EXTENSIONS
    assert not {".txt", ".h5", ".pdf", ".mpg"} & IMAGE_EXTENSIONS  # not images, stubs, write-only, video
    assert is_image_file("a/B.JPEG") and not is_image_file("a/.hidden.jpg") and not is_image_file("x.txt")


# ----------------------------------------------------------------------------- class folders (torchvision)

def test_class_folders_are_torchvision_image_folder_nested_and_hidden(tmp_path):
    root = tmp_path / "folders"
    _image(root / WNIDS[1] / "b.JPEG", fmt="JPEG", color=(0, 0, 255))
    _image(root / WNIDS[0] / "deeper" / "a.png", color=(0, 255, 0))
    _image(root / WNIDS[0] / ".hidden.png")
    (root / WNIDS[0] / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    ds = ImageNetFolder(root, transform=lambda im: im.getpixel((0, 0)))
    assert isinstance(ds, ImageFolder)
    assert ds.classes == WNIDS[:2]
    assert [(p.relative_to(root).as_posix(), t) for p, t in ds.samples] == [
        (f"{WNIDS[0]}/deeper/a.png", 0), (f"{WNIDS[1]}/b.JPEG", 1)]
    assert ds[0] == ((0, 255, 0), 0)
    assert ds.targets == [0, 1]


def test_class_folders_follow_the_wnids_file(tmp_path):
    root = tmp_path / "folders"
    _image(root / WNIDS[2] / "x.jpg")
    ds = ImageNetFolder(root, _wnids_file(tmp_path / "w.txt"))
    assert ds.classes == WNIDS and ds.targets == [2] and len(ds) == 1


def test_class_folder_not_in_the_class_list_is_named(tmp_path):
    root = tmp_path / "folders"
    _image(root / WNIDS[0] / "x.jpg")
    _image(root / "n99999999" / "y.jpg")
    with pytest.raises(TokenSparseError, match="y.jpg.*'n99999999'.*not in the class list"):
        ImageNetFolder(root, _wnids_file(tmp_path / "w.txt"))


def test_flat_files_and_folders_mixed(tmp_path):
    root = tmp_path / "mixed"
    _image(root / f"{WNIDS[2]}_flat.jpg")
    _image(root / WNIDS[1] / "sub.jpg")
    ds = ImageNetFolder(root, _wnids_file(tmp_path / "w.txt"))
    assert [p.name for p, _ in ds.samples] == [f"{WNIDS[2]}_flat.jpg", "sub.jpg"]
    assert ds.targets == [2, 1]


def test_bad_image_in_a_class_folder_is_named(tmp_path):
    root = tmp_path / "folders"
    (root / WNIDS[0]).mkdir(parents=True)
    (root / WNIDS[0] / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    ds = ImageNetFolder(root)
    with pytest.raises(TokenSparseError, match="cannot read image .*broken.jpg"):
        ds[0]


# ----------------------------------------------------------------------------- unlabelled folders

@pytest.fixture
def unlabelled_dir(tmp_path) -> Path:
    root = tmp_path / "photos"
    _image(root / "holiday 2021.JPG", fmt="JPEG", color=(10, 20, 30))
    _image(root / "IMG_0001.png", color=(40, 50, 60))
    _image(root / "trip" / "day1" / "beach.webp", fmt="WEBP", color=(70, 80, 90))
    _image(root / ".thumbs" / "hidden.png")
    _image(root / ".hidden.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_unlabelled_any_names_nested_and_flat(unlabelled_dir):
    ds = UnlabelledImages(unlabelled_dir, transform=lambda im: im.size)
    assert [p.relative_to(unlabelled_dir).as_posix() for p, _ in ds.samples] == [
        "IMG_0001.png", "holiday 2021.JPG", "trip/day1/beach.webp"]
    assert len(ds) == 3 and ds.targets == [UNLABELLED] * 3 == [-1] * 3
    assert ds[2] == ((20, 16), -1)
    img, label = UnlabelledImages(unlabelled_dir)[0]
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (40, 50, 60) and label == -1


def test_unlabelled_errors(tmp_path):
    with pytest.raises(TokenSparseError, match="image directory .*nope.* not found"):
        UnlabelledImages(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "a.txt").write_text("x")
    with pytest.raises(TokenSparseError, match="no images found .*empty"):
        UnlabelledImages(tmp_path / "empty")
    (tmp_path / "empty" / "sub" / "bad.png").write_bytes(b"garbage")
    ds = UnlabelledImages(tmp_path / "empty")
    with pytest.raises(TokenSparseError, match="cannot read image .*bad.png"):
        ds[0]


def test_unlabelled_bad_image_in_a_worker_is_one_line(tmp_path):
    root = tmp_path / "photos"
    _image(root / "a.png")
    (root / "b.png").write_bytes(b"garbage")
    loader = DataLoader(UnlabelledImages(root, transform=lambda im: torch.zeros(1)), batch_size=2, num_workers=1)
    with pytest.raises(TokenSparseError, match="b.png"):
        next(iter(loader))


# ----------------------------------------------------------------------------- splits and model transforms

def test_split_and_limit(unlabelled_dir):
    ds = UnlabelledImages(unlabelled_dir)
    assert len(split_dataset(ds)) == 3
    assert list(split_dataset(ds, "even").indices) == [0, 2]
    assert list(split_dataset(ds, "odd").indices) == [1]
    assert len(split_dataset(ds, "even", limit=2)) == 1
    with pytest.raises(TokenSparseError, match="split must be"):
        split_dataset(ds, "half")
    with pytest.raises(TokenSparseError, match="limit"):
        split_dataset(ds, limit=0)


def test_image_dataset_with_model_transforms(unlabelled_dir, tmp_path):
    model = create_model("vit_tiny_patch16_224", depth=1)
    data = image_dataset(unlabelled_dir, model, training=False, labelled=False)
    x, y = data[0]
    assert x.shape == (3, 224, 224) and y == -1
    flat = tmp_path / "flat"
    _image(flat / f"{WNIDS[1]}_a.jpg")
    _image(flat / f"{WNIDS[0]}_b.jpg")
    train = image_dataset(flat, model, _wnids_file(tmp_path / "w.txt"), training=True, split="odd")
    x, y = train[0]
    assert x.shape == (3, 224, 224) and y == 1 and len(train) == 1  # sorted: b (class 0), a (class 1)
    with pytest.raises(TokenSparseError, match="give a wnids file"):
        image_dataset(flat, model)

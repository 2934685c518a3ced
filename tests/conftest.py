"""Shared fixtures: where the shared data lives (TOKENSPARSE_SHARED or ../shared).

CI always has the shared data, so a missing file is an error here, never a skip.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

VIT_TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def shared_root() -> Path:
    """$TOKENSPARSE_SHARED, else the ``shared`` folder beside the repository root."""
    env = os.environ.get("TOKENSPARSE_SHARED")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / "shared"


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"shared data not found: {path} (set TOKENSPARSE_SHARED)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder."""
    return _require(shared_root())


@pytest.fixture(scope="session")
def sample_images(shared_dir: Path) -> Path:
    """500 real ImageNet photos, flat layout ``<wnid>_<name>.JPEG``."""
    return _require(shared_dir / "data" / "imagenet-sample" / "images")


@pytest.fixture(scope="session")
def sample_wnids(shared_dir: Path) -> Path:
    """The 1000 ImageNet-1k classes, line i = class i."""
    return _require(shared_dir / "data" / "imagenet-sample" / "wnids.txt")


@pytest.fixture(scope="session")
def images_dir(sample_images: Path) -> Path:
    return sample_images


@pytest.fixture(scope="session")
def wnids_file(sample_wnids: Path) -> Path:
    return sample_wnids


@pytest.fixture(scope="session")
def vit_tiny_weights(shared_dir: Path) -> Path:
    """Real pretrained weights of ``vit_tiny_patch16_224.augreg_in21k_ft_in1k``."""
    return _require(shared_dir / "weights" / f"{VIT_TINY}.safetensors")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    """Six random JPEGs in the flat layout with a wnids file (timm's ``test_vit`` resizes them)."""
    root = tmp_path / "images"
    root.mkdir()
    wnids = ["n00000001", "n00000002", "n00000003"]
    (tmp_path / "wnids.txt").write_text("\n".join(f"{w} class" for w in wnids) + "\n")
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"{wnids[i % 3]}_{i}.JPEG")
    return root

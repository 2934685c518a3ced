"""Shared fixtures: where the shared data lives (TOKENSPARSE_SHARED or ../shared).

CI always has the shared data, so a missing file is an error here, never a skip.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import tokensparse
from tokensparse.data import ImageNetFolder, model_transform
from tokensparse.utils import output_logits

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


REAL_SPECS = ("tome:r=13", "mctf", "evit:keep_rate=0.7", "topk", "ppt", "evovit:keep_rate=0.7", "tofu", "pitome",
              "diffrate", "zerotprune")
"""The training-free methods measured with real weights on the shared images (:func:`vit_tiny_real`)."""


@dataclass
class RealRun:
    """timm ViT-Tiny (shared weights) on the 500 shared images: ``images`` preprocessed once with the
    model's own transform, ``labels``, and ``logits[spec]`` unreduced (``"none"``) and per method."""
    images: torch.Tensor
    labels: torch.Tensor
    logits: dict[str, torch.Tensor]

    def top1(self, spec: str, n: int | None = None) -> float:
        return 100.0 * (self.logits[spec][:n].argmax(-1) == self.labels[:n]).float().mean().item()

    def agreement(self, spec: str, n: int | None = None) -> float:
        same = self.logits[spec][:n].argmax(-1) == self.logits["none"][:n].argmax(-1)
        return 100.0 * same.float().mean().item()


def run_batches(model: torch.nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Logits of ``model`` on ``images``, in batches, two threads, inference mode (batches of 32: a
    quarter faster on this CPU than batches of 125, whose activations leave the cache)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            outs = [model(images[i:i + batch]) for i in range(0, len(images), batch)]
        return torch.cat([output_logits(o) for o in outs])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def vit_tiny_real(vit_tiny_weights, sample_images, sample_wnids) -> RealRun:
    """One pass of timm ViT-Tiny per method over the 500 shared images, shared by every real-weights test."""
    model = timm.create_model(VIT_TINY, pretrained=True, pretrained_cfg_overlay={"file": str(vit_tiny_weights)}).eval()
    data = ImageNetFolder(sample_images, sample_wnids, transform=model_transform(model))
    items = [data[i] for i in range(len(data))]
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([label for _, label in items])
    logits = {"none": run_batches(model, images)}
    for spec in REAL_SPECS:
        tokensparse.patch(model, spec)
        logits[spec] = run_batches(model, images)
        tokensparse.unpatch(model)
    return RealRun(images, labels, logits)

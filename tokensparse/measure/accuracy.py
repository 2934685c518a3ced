"""ImageNet-style accuracy (top-1, top-5) and agreement with a reference model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import timm.data
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import TokenSparseError
from ._common import eval_mode, positive_int, progress_bar, resolve_device

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".gif"})
_LAYOUTS = ("class sub-folders (ROOT/<wnid>/*.JPEG)", "flat files (ROOT/<wnid>_<name>.JPEG)")


def read_wnids(path: str | Path) -> list[str]:
    """WordNet ids from a file whose line i is class i (first whitespace token)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TokenSparseError(f"wnids file {str(p)!r} not found")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenSparseError(f"cannot read wnids file {str(p)!r}: {exc}") from None
    wnids = [line.split()[0] for line in lines if line.strip()]
    if not wnids:
        raise TokenSparseError(f"wnids file {str(p)!r} is empty (expected one wnid per line)")
    return wnids


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and \
        path.suffix.lower() in IMAGE_EXTENSIONS


def _scan_folders(root: Path) -> list[tuple[Path, str]]:
    """(image, wnid) for every image under a class sub-folder of ``root``."""
    found = []
    for sub in _class_dirs(root):
        found += [(p, sub.name) for p in sorted(sub.rglob("*")) if _is_image(p)]
    return found


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_flat(root: Path) -> list[tuple[Path, str]]:
    """(image, wnid) for every ``<wnid>_<name>.<ext>`` image directly in ``root``."""
    found = []
    for p in sorted(root.iterdir()):
        if not _is_image(p):
            continue
        wnid, sep, _ = p.stem.partition("_")
        if not sep or not wnid:
            raise TokenSparseError(
                f"cannot tell the class of image {str(p)!r}: flat files must be named "
                f"<wnid>_<name>{p.suffix}")
        found.append((p, wnid))
    return found


class ImageNetFolder(Dataset):
    """ImageNet-style images with WordNet-id labels, in either of two layouts.

    ``root/<wnid>/*.JPEG`` (class sub-folders) or ``root/<wnid>_<name>.JPEG`` (flat). Class
    indices come from ``wnids_file`` (line i = class i); without one, sub-folder layouts use
    the sorted folder names, and flat layouts are an error. Items are
    ``(transform(image), class_index)``; images are RGB PIL images before the transform.
    """

    def __init__(self, root: str | Path, wnids_file: str | Path | None = None,
                 transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "not found"
            raise TokenSparseError(f"image directory {str(self.root)!r} {what}")
        self.transform = transform
        found = _scan_flat(self.root) + _scan_folders(self.root)
        if not found:
            raise TokenSparseError(
                f"no images found in {str(self.root)!r}; tried {' and '.join(_LAYOUTS)} with "
                f"extensions {', '.join(sorted(IMAGE_EXTENSIONS))}")
        self.classes = self._classes(wnids_file, found)
        self.class_to_idx = {w: i for i, w in reversed(list(enumerate(self.classes)))}
        self.samples = [(p, self._index(p, w)) for p, w in found]
        self.targets = [t for _, t in self.samples]

    def _classes(self, wnids_file: str | Path | None,
                 found: list[tuple[Path, str]]) -> list[str]:
        if wnids_file is not None:
            return read_wnids(wnids_file)
        flat = [p for p, _ in found if p.parent == self.root]
        if flat:
            raise TokenSparseError(
                f"images in {str(self.root)!r} are flat files (e.g. {flat[0].name!r}): "
                f"give a wnids file (line i = class i) to map them to class indices")
        return [p.name for p in _class_dirs(self.root)]

    def _index(self, path: Path, wnid: str) -> int:
        if wnid not in self.class_to_idx:
            raise TokenSparseError(
                f"image {str(path)!r} has class {wnid!r}, which is not in the class list "
                f"({len(self.classes)} classes)")
        return self.class_to_idx[wnid]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        """The decoded RGB image at ``index``; TokenSparseError naming the file if unreadable."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise TokenSparseError(f"cannot read image {str(path)!r}: {exc}") from None

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.load(index)
        return (self.transform(img) if self.transform else img), self.samples[index][1]


@dataclass(frozen=True)
class _MultiTransform:
    """Apply several transforms to one decoded image (decode once, many preprocessings)."""

    transforms: tuple[Callable[[Image.Image], torch.Tensor], ...]

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, ...]:
        return tuple(t(img) for t in self.transforms)


def _config_key(model: nn.Module) -> tuple:
    cfg = timm.data.resolve_data_config({}, model=model)
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()))


def _worker_message(exc: TokenSparseError) -> str:
    """The original message of an error re-raised from a DataLoader worker."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return str(exc)
    return lines[-1].split("TokenSparseError: ", 1)[-1]


@dataclass
class _Predictions:
    topk: dict[str, torch.Tensor]  # name -> (n, k) class indices, best first
    targets: torch.Tensor          # (n,)


def _predict_many(models: Mapping[str, nn.Module], images_dir: str | Path,
                  wnids_file: str | Path | None, batch_size: int, num_workers: int,
                  device: str | torch.device, limit: int | None,
                  progress: bool) -> _Predictions:
    """Top-5 predictions of every model in one pass over the images."""
    dev = resolve_device(device)
    unique: dict[int, nn.Module] = {id(m): m for m in models.values()}
    keys = {mid: _config_key(m) for mid, m in unique.items()}
    groups = list(dict.fromkeys(keys.values()))
    transform = _MultiTransform(tuple(
        timm.data.create_transform(**dict(g)) for g in groups))
    dataset = ImageNetFolder(images_dir, wnids_file, transform=transform)
    data: Dataset = dataset
    if limit is not None:
        data = Subset(dataset, range(min(positive_int(limit, "limit"), len(dataset))))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    topk: dict[int, list[torch.Tensor]] = {mid: [] for mid in unique}
    targets: list[torch.Tensor] = []
    for m in unique.values():
        m.to(dev)
    try:
        with eval_mode(*unique.values()), torch.inference_mode(), \
                progress_bar("accuracy", len(data), progress) as advance:
            for inputs, target in loader:
                for mid, m in unique.items():
                    logits = m(inputs[groups.index(keys[mid])].to(dev))
                    _check_classes(logits, len(dataset.classes), dataset.root)
                    topk[mid].append(logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu())
                targets.append(target)
                advance(len(target))
    except TokenSparseError as exc:
        raise TokenSparseError(_worker_message(exc)) from None
    return _Predictions({n: torch.cat(topk[id(m)]) for n, m in models.items()},
                        torch.cat(targets))


def _check_classes(logits: torch.Tensor, n_classes: int, root: Path) -> None:
    if logits.ndim != 2 or logits.shape[-1] != n_classes:
        raise TokenSparseError(
            f"model outputs {tuple(logits.shape)} logits but the class list for "
            f"{str(root)!r} has {n_classes} classes")


def _metrics(topk: torch.Tensor, targets: torch.Tensor,
             reference_top1: torch.Tensor | None) -> dict[str, Any]:
    n = int(targets.numel())
    top1 = (topk[:, 0] == targets).float().mean().item() * 100
    top5 = (topk == targets[:, None]).any(dim=1).float().mean().item() * 100
    agreement = None
    if reference_top1 is not None:
        agreement = (topk[:, 0] == reference_top1).float().mean().item() * 100
    return {"top1": top1, "top5": top5, "agreement": agreement, "n": n}


def evaluate_many(models: Mapping[str, nn.Module], images_dir: str | Path,
                  wnids_file: str | Path | None = None, reference_key: str | None = None,
                  batch_size: int = 32, num_workers: int = 0,
                  device: str | torch.device = "cpu", limit: int | None = None,
                  progress: bool = True) -> dict[str, dict[str, Any]]:
    """Evaluate several models in one pass over the images (each image decoded once).

    Returns ``{name: {"top1", "top5", "agreement", "n"}}`` with percentages in 0-100;
    ``agreement`` is the % of images whose top-1 equals ``models[reference_key]``'s top-1
    (``None`` without a reference). Each model is preprocessed with its own timm data config.
    ``limit`` evaluates only the first ``limit`` images (sorted by path). Models are moved to
    ``device`` in place; their train/eval mode is restored.
    """
    if not models:
        raise TokenSparseError("evaluate_many needs at least one model")
    if reference_key is not None and reference_key not in models:
        raise TokenSparseError(
            f"reference {reference_key!r} is not one of the models: {', '.join(models)}")
    positive_int(batch_size, "batch_size")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise TokenSparseError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    preds = _predict_many(models, images_dir, wnids_file, batch_size, num_workers, device,
                          limit, progress)
    ref = preds.topk[reference_key][:, 0] if reference_key is not None else None
    return {name: _metrics(preds.topk[name], preds.targets, ref) for name in models}


def evaluate(model: nn.Module, images_dir: str | Path, wnids_file: str | Path | None = None,
             reference: nn.Module | torch.Tensor | None = None, batch_size: int = 32,
             num_workers: int = 0, device: str | torch.device = "cpu",
             limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Top-1, top-5 (0-100), agreement with ``reference`` and image count ``n`` of one model.

    ``reference``: another model (evaluated in the same pass), or precomputed predictions
    for the same images: class indices of shape (n,) or logits of shape (n, classes).
    """
    common = dict(wnids_file=wnids_file, batch_size=batch_size, num_workers=num_workers,
                  device=device, limit=limit, progress=progress)
    if reference is None or isinstance(reference, nn.Module):
        models = {"model": model} if reference is None else {"model": model, "reference": reference}
        key = None if reference is None else "reference"
        return evaluate_many(models, images_dir, reference_key=key, **common)["model"]
    ref = torch.as_tensor(reference)
    ref = ref.argmax(dim=-1) if ref.ndim == 2 else ref
    positive_int(batch_size, "batch_size")
    preds = _predict_many({"model": model}, images_dir, wnids_file, batch_size, num_workers,
                          device, limit, progress)
    n = int(preds.targets.numel())
    if ref.ndim != 1 or ref.numel() != n:
        raise TokenSparseError(
            f"reference predictions have shape {tuple(torch.as_tensor(reference).shape)}, "
            f"expected ({n},) class indices or ({n}, classes) logits for the {n} images")
    return _metrics(preds.topk["model"], preds.targets, ref.cpu().long())

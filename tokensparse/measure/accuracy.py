"""ImageNet-style accuracy (top-1, top-5) and agreement with a reference model."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm.data
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from ..data import ImageNetFolder, data_config, dataset_files, split_dataset, worker_error_message
from ..errors import TokenSparseError
from ..utils import eval_mode, output_logits, positive_int, progress_bar
from ._common import measurement_device


@dataclass(frozen=True)
class _MultiTransform:
    """Apply several transforms to one decoded image (decode once, many preprocessings)."""

    transforms: tuple[Callable[[Image.Image], torch.Tensor], ...]

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, ...]:
        return tuple(t(img) for t in self.transforms)


def _config_key(model: nn.Module) -> tuple:
    cfg = data_config(model)
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()))


@dataclass
class _Predictions:
    topk: dict[str, torch.Tensor]  # name -> (n, k) class indices, best first
    targets: torch.Tensor          # (n,)


def _predict_many(models: Mapping[str, nn.Module], images_dir: str | Path,
                  wnids_file: str | Path | None, batch_size: int, num_workers: int,
                  device: str | torch.device, limit: int | None,
                  progress: bool) -> _Predictions:
    """Top-5 predictions of every model in one pass over the images."""
    dev = measurement_device(device)
    unique: dict[int, nn.Module] = {id(m): m for m in models.values()}
    names = {mid: [n for n, m in models.items() if id(m) == mid] for mid in unique}
    keys = {mid: _config_key(m) for mid, m in unique.items()}
    groups = list(dict.fromkeys(keys.values()))
    transform = _MultiTransform(tuple(
        timm.data.create_transform(**dict(g)) for g in groups))
    dataset = ImageNetFolder(images_dir, wnids_file, transform=transform)
    data = split_dataset(dataset, limit=limit)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    topk: dict[int, list[torch.Tensor]] = {mid: [] for mid in unique}
    targets: list[torch.Tensor] = []
    for m in unique.values():
        m.to(dev)
    done = 0
    try:
        with eval_mode(*unique.values()), torch.inference_mode(), \
                progress_bar("accuracy", len(data), progress) as advance:
            for inputs, target in loader:
                for mid, m in unique.items():
                    logits = output_logits(m(inputs[groups.index(keys[mid])].to(dev)))
                    _check_classes(logits, len(dataset.classes), dataset.root)
                    _check_finite(logits, names[mid], data, done)
                    topk[mid].append(logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu())
                targets.append(target)
                done += len(target)
                advance(len(target))
    except TokenSparseError as exc:
        raise TokenSparseError(worker_error_message(exc)) from None
    return _Predictions({n: torch.cat(topk[id(m)]) for n, m in models.items()},
                        torch.cat(targets))


def _check_finite(logits: torch.Tensor, names: list[str], data: Any, offset: int) -> None:
    """TokenSparseError naming the model and the image when ``logits`` hold NaN or inf (they
    would otherwise count as predictions: all-NaN logits agree with each other everywhere)."""
    finite = torch.isfinite(logits).all(dim=-1)
    if bool(finite.all()):
        return
    row = int((~finite).nonzero()[0, 0])
    image = dataset_files(data)[offset + row]
    raise TokenSparseError(
        f"model {' / '.join(map(repr, names))} gives NaN or inf logits for image {str(image)!r} "
        f"({int((~finite).sum())} of the {finite.numel()} images in its batch): its weights or learned parts "
        f"(e.g. predictors) hold NaN/inf or its computation overflows; no accuracy can be reported")


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


def fidelity(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """``(agreement %, mean KL(reference || logits))`` of class logits ``(n, classes)`` against a
    reference model's logits on the same images: the share with the same top-1, and the KL
    divergence of the class distributions averaged over images (smooth where top-1 on a few
    hundred images moves a whole image at a time)."""
    agreement = 100.0 * (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits.float(), dim=-1),
                                    torch.log_softmax(reference.float(), dim=-1), log_target=True,
                                    reduction="batchmean").item()
    return agreement, kl


def kept_logprob(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``(n,)`` per image: the log-probability ``logits`` give the reference's top-1 class. Its mean
    tracks changed predictions (a prediction changes when this falls below another class's), where
    KL weighs the whole distribution: :func:`tokensparse.tune.tune` chooses by it."""
    top1 = reference.argmax(-1, keepdim=True)
    return torch.log_softmax(logits.float(), dim=-1).gather(1, top1).squeeze(1)


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
    common = {"wnids_file": wnids_file, "batch_size": batch_size, "num_workers": num_workers,
              "device": device, "limit": limit, "progress": progress}
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

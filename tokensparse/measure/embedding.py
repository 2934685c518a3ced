"""Fidelity of feature extractors: how close a reduced model's image embeddings stay to the unreduced ones.

A model without a classifier (a timm model with ``num_classes=0``, a transformers ``ViTModel``,
``Dinov2Model``, ``CLIPVisionModel``, ``SiglipVisionModel``, ...) has no predictions to agree on;
what users keep of it is its pooled embedding (:func:`embedding_of`). Two numbers say how much of
it a reduction keeps, on a set of images:

- the mean cosine similarity of each image's embedding to its unreduced embedding;
- neighbour agreement: the share of images whose nearest neighbour among the evaluated images
  (by cosine similarity) is the same image as with the unreduced embeddings (what retrieval
  and deduplication see).

``bench`` and ``sweep`` report them in place of top-1 and agreement for such models, and ``tune``
searches with them (neighbour agreement in place of agreement, ``1 - cosine`` in place of KL,
each image's cosine similarity in place of the log-probability of the unreduced top-1).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..data import UnlabelledImages, data_config, split_dataset
from ..errors import TokenSparseError
from ..families import get_family
from ..families.hf import is_transformers_model
from ..utils import eval_mode, positive_int, progress_bar
from ._common import measurement_device


def is_classifier(model: nn.Module) -> bool:
    """Whether ``model`` outputs class logits (a timm model with ``num_classes > 0``, a transformers
    classifier) rather than features."""
    if is_transformers_model(model):
        return get_family(model).has_head
    return int(getattr(model, "num_classes", 0)) > 0


def embedding_of(out: Any) -> torch.Tensor:
    """``(B, D)`` image embedding from a feature extractor's output: a tensor as it is (timm), else the
    transformers output's ``image_embeds`` (CLIP with projection), its ``pooler_output`` (ViT's pooler,
    CLIP's normalised class token, DINOv2's class token, SigLIP's attention-pooling head), or without
    one the mean of ``last_hidden_state``."""
    if isinstance(out, torch.Tensor):
        return out if out.ndim == 2 else out.flatten(1)
    for name in ("image_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    tokens = getattr(out, "last_hidden_state", None)
    if isinstance(tokens, torch.Tensor):
        return tokens.mean(dim=1)
    raise TokenSparseError(f"cannot find an image embedding in a {type(out).__name__}")


def cosine_to(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``(n,)`` cosine similarity of each embedding to its reference embedding."""
    return F.cosine_similarity(embeddings.float(), reference.float(), dim=-1)


def neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """``(n,)`` each image's nearest other image by cosine similarity (itself when it is alone)."""
    x = F.normalize(embeddings.float(), dim=-1)
    sim = x @ x.T
    if len(x) > 1:
        sim.fill_diagonal_(float("-inf"))
    return sim.argmax(dim=-1)


def embedding_fidelity(embeddings: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """``(neighbour agreement %, mean cosine similarity)`` of embeddings ``(n, D)`` against the
    reference model's on the same images (see the module docstring)."""
    if embeddings.shape != reference.shape:
        raise TokenSparseError(f"embeddings of shape {tuple(embeddings.shape)} cannot be compared with the "
                               f"reference's {tuple(reference.shape)}")
    agree = 100.0 * (neighbours(embeddings) == neighbours(reference)).float().mean().item()
    return agree, cosine_to(embeddings, reference).mean().item()


def embed_many(models: Mapping[str, nn.Module], images: str | Path, *, batch_size: int = 32,
               device: str | torch.device = "cpu", limit: int | None = None,
               progress: bool = True) -> dict[str, torch.Tensor]:
    """``{name: (n, D)}`` every model's embeddings (:func:`embedding_of`) of the images under
    ``images`` (any names, no labels; the first ``limit`` by path), each preprocessed with its own
    data config, in one pass (each image decoded once)."""
    positive_int(batch_size, "batch_size")
    dev = measurement_device(device)
    transforms = {name: timm.data.create_transform(**data_config(m)) for name, m in models.items()}
    data = split_dataset(UnlabelledImages(images, lambda img: {n: t(img) for n, t in transforms.items()}),
                         limit=limit)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    for m in models.values():
        m.to(dev)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    with eval_mode(*models.values()), torch.inference_mode(), progress_bar("embeddings", len(data), progress) as advance:
        for batch, _ in loader:
            for name, m in models.items():
                emb = embedding_of(m(batch[name].to(dev))).float().cpu()
                if not bool(torch.isfinite(emb).all()):
                    raise TokenSparseError(f"model {name!r} gives NaN or inf embeddings: its weights or learned parts "
                                           f"hold NaN/inf or its computation overflows")
                out[name].append(emb)
            advance(len(next(iter(batch.values()))))
    return {name: torch.cat(parts) for name, parts in out.items()}


__all__ = ["cosine_to", "embed_many", "embedding_fidelity", "embedding_of", "is_classifier", "neighbours"]

"""DiffRate's own idea: learn each block's pruning and merging counts by gradient against a GMACs target.

Follows the authors' search (OpenGVLab/DiffRate, commit 91ae3e3: ``DiffRate/ddp.py``,
``DiffRate/patch/deit.py`` in training mode, ``engine.py``): every block after the first gets two
differentiable discrete proxies (:class:`~tokensparse.methods.diffrate.RateChoice`, candidates every
``granularity`` tokens) whose expected counts decide, with straight-through gradients, which sorted
tokens are masked (pruned) and which are averaged into an important token and masked (merged); the
loss is the distance to the model's output plus ``gmacs_weight x ((GMACs - target) / target)^2``, the
GMACs computed from the counts; only the proxies learn (AdamW, cosine learning rate), the backbone is
frozen. Where we differ: the authors train against the labels (cross-entropy) on ImageNet; we
distil the unreduced model's logits (KL) on the user's unlabelled images, which is what calibration
is for; and the GMACs penalty is on the relative error, with the weight (100) that makes it the authors'
``5 x (GFLOPs - target)^2`` at DeiT-S's 4.6 GFLOPs: their absolute penalty would barely bind on a model
of 1.25 GMACs (ViT-Tiny: 2% off the target costs 0.001 in the loss). The result is a ``diffrate`` spec
with the learned per-block counts.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..api import patch, unpatch
from ..errors import TokenSparseError
from ..families import get_family
from ..measure import gmacs
from ..methods.diffrate import DiffRateReducer
from ..spec import format_spec
from ..utils import progress_bar, resolve_device
from .calibrate import cache_teacher, forward_from
from .config import LearningConfig, check_int, check_number
from .finetune import adamw_schedule, mix_seed, seed_everything
from .losses import logit_distillation


@dataclass(kw_only=True)
class DiffRateConfig(LearningConfig):
    """DiffRate search options: the authors' granularity (4) and cosine learning rate to 0.001 without
    weight decay; a learning rate of 0.05 (theirs: 0.01 over ImageNet epochs, thousands of steps; a
    few hundred images give a hundred steps); ``gmacs_weight`` on the relative GMACs error (100: the
    authors' 5 on the absolute error at DeiT-S's 4.6 GFLOPs); ``flip`` adds mirrored images."""
    epochs: int = 6
    batch_size: int = 32
    lr: float = 0.05
    min_lr: float = 0.001
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    granularity: int = 4
    gmacs_weight: float = 100.0
    flip: bool = True

    min_epochs: ClassVar[int] = 1

    def validate(self) -> None:
        super().validate()
        check_int(self, "granularity", 1)
        check_number(self, "gmacs_weight", positive=True)


def ste_min(n: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``min(n, a, b)`` whose gradient reaches ``a`` and ``b`` (not ``n``), as the authors' ``STE_Min``."""
    value = torch.minimum(torch.minimum(n.detach(), a.detach()), b.detach())
    return value + (a - a.detach()) + (b - b.detach())


class GMACsModel:
    """GMACs of a ViT-like model from its per-block token counts: each block ``4 N C^2 + 2 N^2 C`` in
    the attention and ``2 N C H`` in the MLP (``H`` its hidden width), plus the embedding and head,
    taken as the measured unreduced GMACs minus its blocks."""

    def __init__(self, measured: float, depth: int, tokens: int, dim: int, hidden: int) -> None:
        self.dim, self.hidden, self.depth, self.tokens = dim, hidden, depth, tokens
        self.fixed = measured * 1e9 - depth * (self.attention(float(tokens)) + self.mlp(float(tokens)))

    def attention(self, n: Tensor | float) -> Tensor | float:
        return 4 * n * self.dim ** 2 + 2 * n * n * self.dim

    def mlp(self, n: Tensor | float) -> Tensor | float:
        return 2 * n * self.dim * self.hidden

    def of(self, kept: Sequence[tuple[Tensor, Tensor] | None], num_prefix: int) -> Tensor:
        """GMACs (a tensor with the counts' gradients) for per-block ``(prune, merge)`` patch counts (None: all)."""
        n = torch.tensor(float(self.tokens))
        total = torch.tensor(self.fixed)
        for k in kept:
            total = total + self.attention(n)
            if k is not None:
                n = ste_min(n, k[0] + num_prefix, k[1] + num_prefix)
            total = total + self.mlp(n)
        return total / 1e9


def _hidden_width(block: nn.Module, dim: int) -> int:
    """The MLP's hidden width: the widest linear layer reading ``dim`` features (wider than qkv's 3 x dim)."""
    widths = [m.out_features for m in block.modules() if isinstance(m, nn.Linear) and m.in_features == dim]
    if not widths:
        raise TokenSparseError("cannot find the blocks' linear layers to count their multiply-adds")
    return max(widths)


@dataclass
class DiffRateResult:
    """The learned spec, its GMACs measured by a real forward pass, and the search's last predicted GMACs."""
    spec: str
    gmacs: float
    predicted: float
    target: float


def calibrate_diffrate(model: nn.Module, dataset: Dataset, gmacs_target: float,
                       config: DiffRateConfig | None = None, progress: bool = True,
                       device: str = "cpu") -> DiffRateResult:
    """Learn DiffRate's per-block prune and merge counts for ``model`` (an unpatched timm or transformers
    ViT with a class token and trained weights) to reach ``gmacs_target`` GMACs per image, by distillation
    from the unreduced model on ``dataset`` (``(image, anything)`` items; labels unused). Returns the
    spec; the model is left unpatched."""
    cfg = config or DiffRateConfig()
    cfg.validate()
    if isinstance(gmacs_target, bool) or not isinstance(gmacs_target, (int, float)) or gmacs_target <= 0:
        raise TokenSparseError(f"the GMACs target must be a number > 0, got {gmacs_target!r}")
    if len(dataset) == 0:
        raise TokenSparseError("calibration needs at least one image")
    dev = resolve_device(device)
    family = get_family(model)
    family.require_class_token("diffrate")
    if not family.has_head:
        raise TokenSparseError("diffrate calibration distils the model's logits: give a model with a classification head")
    model.to(dev).eval()
    full = gmacs(model)
    P, depth = family.num_prefix, len(family.blocks)
    patches = family.num_positions()
    if gmacs_target >= full:
        raise TokenSparseError(f"the GMACs target {gmacs_target:g} is not below the unreduced model's {full:.3f} GMACs")
    seed_everything(cfg.seed)
    with progress_bar("teacher", len(dataset), progress) as advance:
        cache = cache_teacher(model, dataset, [1], cfg.batch_size, cfg.flip, dev, cfg.num_workers,
                              imitation=False, progress=advance)
    dim = cache.inputs.shape[-1]
    cost = GMACsModel(full, depth, P + patches, dim, _hidden_width(family.blocks[0], dim))
    spec = format_spec("diffrate", {"prune_kept": [patches] * depth, "merge_kept": [patches] * depth})
    patch(model, spec)
    try:
        reducers = [m for m in model.modules() if isinstance(m, DiffRateReducer)]
        for r in reducers[1:]:
            r.learnable(patches, cfg.granularity)
        model.to(dev).eval().requires_grad_(False)
        params = [p for r in reducers[1:] for p in r.rates.parameters()]
        for p in params:
            p.requires_grad_(True)
        n = len(cache)
        optimizer, scheduler, per_epoch = adamw_schedule(params, cfg, n)
        total = per_epoch * cfg.epochs
        predicted: list[float] = []
        with progress_bar("diffrate", total, progress) as advance:
            for epoch in range(cfg.epochs):
                order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(cfg.seed, epoch)))
                for i in range(0, n, cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    for r in reducers:
                        r.train()
                    logits = forward_from(model, cache.inputs[idx].to(dev), 1)
                    macs = cost.of([None] + [r.kept for r in reducers[1:]], P)
                    loss = logit_distillation(logits, cache.logits[idx].to(dev)) + \
                        cfg.gmacs_weight * ((macs - gmacs_target) / gmacs_target) ** 2
                    if not torch.isfinite(loss.detach()):
                        raise TokenSparseError(f"diffrate calibration: the loss is not finite in epoch {epoch + 1}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    predicted.append(float(macs.detach()))
                    advance(1)
        learned = [(patches, patches)] + [r.learned() for r in reducers[1:]]
    finally:
        model.eval()
        unpatch(model)
        model.requires_grad_(True)
    prune, merge = [p for p, _ in learned], [m for _, m in learned]
    spec = format_spec("diffrate", {"prune_kept": prune, "merge_kept": merge})
    patch(model, spec)
    measured = gmacs(model)
    unpatch(model)
    return DiffRateResult(spec, measured, statistics.mean(predicted[-per_epoch:]), float(gmacs_target))


__all__ = ["DiffRateConfig", "DiffRateResult", "GMACsModel", "calibrate_diffrate", "ste_min"]

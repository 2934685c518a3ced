"""Fast calibration: train only DynamicViT's new parts on unlabelled images, backbone frozen.

The new parts are the prediction modules (and, in ConvNeXt / Swin, the fast paths). The
unreduced model is the teacher. Because the backbone is frozen and everything before the
first location is unchanged, each image goes through that part and through the teacher
exactly once: the tokens (or feature map) entering the first location, the teacher's logits
and its final tokens (or feature map) are cached, and every epoch only runs the model from the
first location on (gradients flowing to the new parts only). Loss: KL to the teacher's
logits + MSE to its final kept patch tokens (ViT) or its final feature map (ConvNeXt / Swin)
+ ratio loss (no labels needed).

For ViTs with a class token, an optional cheap warm start (``imitation_epochs``) first teaches
each predictor to rank tokens like the teacher's class attention at its block, using cached
teacher tokens (no block runs): a few hundred images are far too few to learn token
importance from the end-to-end loss alone, and this starts the predictors from the
training-free ranking.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..errors import TokenSparseError
from ..methods import dynamicvit as dv
from .finetune import WarmupCosine, mix_seed, seed_everything
from .losses import DynamicViTLoss, Teacher


@dataclass
class CalibrateConfig:
    """Calibration options. ``flip``: also cache horizontally flipped images (2x data).

    ``ratio_weight`` None: the authors' weight for the model (2.0 ViT, 10.0 ConvNeXt / Swin).

    ``imitation_epochs``: before the end-to-end distillation (``epochs``), warm-start each
    predictor to rank tokens like the teacher's class attention at its block (top-k
    membership as the keep label; cheap: predictors only, on cached teacher tokens).
    0 turns this off (and it is skipped for models without a class token, ConvNeXt and Swin).
    """
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5
    ratio_weight: Optional[float] = None
    distill_weight: float = 0.5
    token_weight: float = 0.5
    flip: bool = True
    imitation_epochs: int = 30
    imitation_lr: float = 1e-3
    seed: int = 0
    num_workers: int = 0

    def validate(self) -> None:
        for name, low in (("epochs", 0), ("imitation_epochs", 0), ("batch_size", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise TokenSparseError(f"{name} must be an integer >= {low}, got {v!r}")
        if not self.lr > 0:
            raise TokenSparseError(f"lr must be > 0, got {self.lr!r}")


@dataclass
class TeacherCache:
    """Per image: tokens (or feature map) entering block ``start``, teacher logits and final tokens.

    ``stage_tokens`` / ``stage_scores``: per location, the teacher's patch tokens entering
    that block and its head-averaged class attention over them (imitation warm-start).
    """
    start: int
    inputs: Tensor
    logits: Tensor
    tokens: Tensor
    stage_tokens: list[Tensor]
    stage_scores: list[Tensor]

    def __len__(self) -> int:
        return self.inputs.shape[0]


def block_class_attention(block: nn.Module, x: Tensor) -> Tensor:
    """Head-averaged class-token attention ``(B, N)`` of ``block``'s attention on tokens ``x``."""
    from ..ops import class_attention
    attn = block.attn
    B, N, _ = x.shape
    h = block.norm1(x)
    q, k, _ = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return class_attention(q, k, attn.scale).mean(dim=1)


@torch.no_grad()
def cache_teacher(model: nn.Module, dataset: Dataset, locations: list[int], batch_size: int, flip: bool,
                  device: torch.device, num_workers: int = 0, imitation: bool = True,
                  progress: Optional[Callable[[int], None]] = None) -> TeacherCache:
    """Run the unreduced ``model`` once over ``dataset`` (and its mirror images if ``flip``)."""
    from ..patch import family_module, model_family
    model.eval()
    family = family_module(model)
    P = getattr(model, "num_prefix_tokens", 0)
    start = min(locations)
    imitation = imitation and model_family(model) == "vit" and getattr(model, "has_class_token", False)
    inputs, logits, tokens = [], [], []
    stage_tokens: list[list[Tensor]] = [[] for _ in locations]
    stage_scores: list[list[Tensor]] = [[] for _ in locations]
    for images, *_ in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        images = images.to(device)
        views = [images, images.flip(-1)] if flip else [images]
        for view in views:
            if imitation:  # walk the blocks one by one, keeping what the warm start needs at each location
                h = family.run_to(model, view, 0)
                for i, blk in enumerate(model.blocks):
                    if i == start:
                        inputs.append(h.cpu())
                    if i in locations:
                        j = locations.index(i)
                        stage_tokens[j].append(h[:, P:].cpu())
                        stage_scores[j].append(block_class_attention(blk, h)[:, P:].cpu())
                    h = blk(h)
                feats = model.norm(h)
            else:
                h = family.run_to(model, view, start)
                inputs.append(h.cpu())
                feats = family.features_from(model, h, start)
            logits.append(model.forward_head(feats).cpu())
            tokens.append(family.feature_tokens(feats).cpu())
        if progress is not None:
            progress(len(images))
    return TeacherCache(start, torch.cat(inputs), torch.cat(logits), torch.cat(tokens),
                        [torch.cat(t) for t in stage_tokens if t], [torch.cat(t) for t in stage_scores if t])


def imitate_class_attention(stage_map: dict[int, "dv.PredictionModule"], cache: TeacherCache, epochs: int,
                            lr: float, batch_size: int, seed: int, device: torch.device,
                            progress: Optional[Callable[[int], None]] = None) -> None:
    """Warm-start predictors: keep label = top-k of the teacher's class attention at each location."""
    import torch.nn.functional as F
    stages = list(stage_map.values())
    params = [p for s in stages for p in s.predictor.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n, n0 = len(cache), cache.stage_tokens[0].shape[1]
    labels = []
    for s, scores in zip(stages, cache.stage_scores):
        k = dv.keep_tokens(n0, s.ratio)
        keep = torch.zeros_like(scores, dtype=torch.long).scatter_(1, scores.topk(k, dim=1).indices, 1)
        labels.append(1 - keep)  # class 0 = keep
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 5)))
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            loss = sum(F.nll_loss(s.predictor(toks[idx].to(device)).flatten(0, 1), lab[idx].to(device).flatten())
                       for s, toks, lab in zip(stages, cache.stage_tokens, labels))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(1)


def forward_from(model: nn.Module, h: Tensor, start: int) -> Tensor:
    """Logits of a patched model run from block ``start`` on ``h``; records its final tokens."""
    from ..patch import family_module
    family = family_module(model)
    features = family.features_from(model, h, start)
    model._ts_state.features = family.feature_tokens(features)
    return model.forward_head(features)


def calibrate(model: nn.Module, dataset: Dataset, method: str = "dynamicvit",
              config: Optional[CalibrateConfig] = None, out: str | Path | None = None,
              progress: bool = True, device: str = "cpu") -> nn.Module:
    """Train DynamicViT's new parts for ``model`` by distillation from its unreduced self.

    ``model``: an unpatched timm ViT, ConvNeXt or Swin classifier with trained weights
    (patched here with ``method``, e.g. ``"dynamicvit:rho=0.7"``), or one already patched with
    ``dynamicvit``. ``dataset`` items are ``(image tensor, anything)``: labels are not used.
    Writes the learned parts to ``out`` (safetensors) if given. Returns the patched model in
    eval mode.
    """
    import tokensparse
    from ..measure._common import progress_bar, resolve_device
    cfg = config or CalibrateConfig()
    cfg.validate()
    dev = resolve_device(device)
    if tokensparse.is_patched(model):
        locations = sorted(dv.prediction_modules(model))
        base = Teacher(model).model
    else:
        locations = sorted(method_plan(model, method))
        base = model
    if len(dataset) == 0:
        raise TokenSparseError("calibration needs at least one image")
    base.to(dev)
    seed_everything(cfg.seed)
    imitation = cfg.imitation_epochs > 0
    with progress_bar("teacher", len(dataset), progress) as advance:
        cache = cache_teacher(base, dataset, locations, cfg.batch_size, cfg.flip, dev, cfg.num_workers,
                              imitation, advance)
    if not tokensparse.is_patched(model):
        tokensparse.patch(model, method)
    model.to(dev)
    stage_map = dv.prediction_modules(model)
    start = min(stage_map)
    model.eval().requires_grad_(False)
    params = dv.learned_parameters(model)
    for s in stage_map.values():
        s.train()
    for p in params:
        p.requires_grad_(True)
    if cache.stage_tokens:
        steps = cfg.imitation_epochs * -(-len(cache) // cfg.batch_size)
        with progress_bar("imitate", steps, progress) as advance:
            imitate_class_attention(stage_map, cache, cfg.imitation_epochs, cfg.imitation_lr, cfg.batch_size,
                                    cfg.seed, dev, advance)
        cache.stage_tokens, cache.stage_scores = [], []
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(cache)
    per_epoch = max(1, -(-n // cfg.batch_size))
    total = per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(round(cfg.warmup_epochs * per_epoch), total, cfg.min_lr / cfg.lr))
    ratio_weight = dv.default_ratio_weight(model) if cfg.ratio_weight is None else cfg.ratio_weight
    loss_fn = DynamicViTLoss(ratio_weight, cfg.distill_weight, cfg.token_weight, ce_weight=0.0)
    step = 0
    try:
        with progress_bar("calibrate", total, progress) as advance:
            for epoch in range(cfg.epochs):
                order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(cfg.seed, epoch)))
                for i in range(0, n, cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    seed_everything(mix_seed(cfg.seed, step, 11))
                    logits = forward_from(model, cache.inputs[idx].to(dev), start)
                    outputs = dv.train_outputs(model)
                    loss, _ = loss_fn(logits, None, outputs, cache.logits[idx].to(dev), cache.tokens[idx].to(dev))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    advance(1)
    finally:
        model.eval()
        model.requires_grad_(True)
    if out is not None:
        dv.save_predictors(model, out)
    return model


def method_plan(model: nn.Module, method: str) -> dict[int, float]:
    """``{block: keep ratio}`` that ``method`` (a dynamicvit spec) gives ``model``; clear error otherwise."""
    from ..methods import get_method
    from ..patch import model_family
    from ..spec import parse_spec
    name, options = parse_spec(method)
    if name != "dynamicvit":
        raise TokenSparseError(f"calibration supports the learned method 'dynamicvit', got {name!r}")
    method_obj = get_method(name)(**options)
    family = model_family(model)
    if family not in method_obj.families:
        raise TokenSparseError(f"method 'dynamicvit' does not support {family} models; it supports: "
                               f"{', '.join(method_obj.families)}")
    if not hasattr(model, "forward_head"):
        raise TokenSparseError("calibration needs a full classifier (with its head), not a features_only model")
    return method_obj.plan(model)

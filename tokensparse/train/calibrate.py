"""Fast calibration: train only DynamicViT's new parts on unlabelled images, backbone frozen.

The new parts are the prediction modules (and, in ConvNeXt / Swin, the fast paths). The
unreduced model is the teacher. Because the backbone is frozen and everything before the
first location is unchanged, each view of an image goes through that part and through the
teacher exactly once: the tokens (or feature map) entering the first location, the teacher's
logits and its final tokens (or feature map) are cached, and every epoch only runs the model
from the first location on (gradients flowing to the new parts only). Loss: KL to the
teacher's logits + MSE to its final kept patch tokens (ViT) or its final feature map
(ConvNeXt / Swin) + ratio loss (no labels needed).

What makes a few hundred images enough (``benchmarks/dynamicvit_calibrate.py`` measures each
step; the README has the numbers):

- *Views*: besides each image and its mirror image, ``views`` random views of it (a random
  resized crop, a flip and brightness / contrast jitter, made from the preprocessed tensor)
  are cached, so the predictors see many more token layouts than there are images.
- *Warm start* (``imitation_epochs``, ViTs with a class token): each predictor first learns
  to rank tokens like a teacher signal at its block (top-k membership as the keep label;
  cheap: predictors only, on cached teacher tokens): ``imitation_target="rollout"``, how
  much each token reaches the class token at the end of the network (attention rollout from
  the block to the last one, Abnar and Zuidema 2020), or ``"attention"``, the block's own
  class attention (what Top-K keeps).
- *Held-out early stopping*: ``holdout`` of the images (none of their views trained on) are
  run through the reduced model, really pruned, after the warm start and after every
  end-to-end epoch; the predictors of the epoch closest to the teacher there (mean KL of the
  logits; MSE of the final tokens for a model without a head) are the ones kept.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..api import is_patched, patch
from ..data import data_config
from ..errors import TokenSparseError
from ..families import AttentionExtras, BlockHook, TokenFamily, get_family, restore
from ..methods import dynamicvit as dv
from ..methods import supported_families
from ..ops import attention_rollout
from ..spec import parse_spec
from ..state import TokenState
from ..utils import check_writable_folder, progress_bar, remove_stale_temp_files, resolve_device
from .config import LearningConfig, check_bool, check_int, check_number
from .finetune import adamw_schedule, mix_seed, seed_everything
from .losses import DynamicViTLoss, Teacher, logit_distillation


@dataclass(kw_only=True)
class CalibrateConfig(LearningConfig):
    """Calibration options (shared ones: :class:`~tokensparse.train.config.LearningConfig`).

    ``flip``: also cache each image's mirror image. ``views``: random views per image (random
    resized crop, flip, brightness / contrast jitter). ``holdout``: share of the images (at
    least one when it is > 0 and there are 10 or more) kept out of training to pick the best
    epoch; 0 keeps the last epoch. ``epochs`` (end-to-end distillation) may be 0.

    ``imitation_epochs``: before the end-to-end distillation, warm-start each predictor to rank
    tokens like ``imitation_target`` (``"rollout"`` or ``"attention"``, see the module
    docstring) at ``imitation_lr``; 0 turns this off (it is skipped for models without a
    class token, ConvNeXt and Swin).
    """
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5
    num_workers: int = 0
    flip: bool = True
    views: int = 4
    holdout: float = 0.1
    imitation_epochs: int = 15
    imitation_lr: float = 1e-3
    imitation_target: str = "rollout"

    min_epochs: ClassVar[int] = 0

    def validate(self) -> None:
        super().validate()
        check_int(self, "imitation_epochs", 0)
        check_int(self, "views", 0)
        check_number(self, "imitation_lr", positive=True)
        check_bool(self, "flip")
        if not self.lr > 0:
            raise TokenSparseError(f"lr must be > 0 and finite, got {self.lr!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) or not 0 <= self.holdout < 1:
            raise TokenSparseError(f"holdout must be a number in [0, 1), got {self.holdout!r}")
        if self.imitation_target not in IMITATION_TARGETS:
            raise TokenSparseError(f"imitation_target must be one of {', '.join(IMITATION_TARGETS)}, "
                                   f"got {self.imitation_target!r}")
        if self.epochs > 0:
            self.check_some_loss()


IMITATION_TARGETS = ("rollout", "attention")
"""What the warm start teaches predictors to rank by (:class:`CalibrateConfig`)."""


@dataclass
class TeacherCache:
    """Per view: tokens (or feature map) entering block ``start``, teacher logits (None for a model
    without a classification head) and final tokens.

    ``stage_tokens`` / ``stage_scores``: per location, the teacher's patch tokens entering
    that block and the warm start's target scores over them.
    """
    start: int
    inputs: Tensor
    logits: Tensor | None
    tokens: Tensor
    stage_tokens: list[Tensor]
    stage_scores: list[Tensor]

    def __len__(self) -> int:
        return self.inputs.shape[0]


class TeacherRecorder(BlockHook):
    """At one block of the unreduced teacher: its input tokens (``keep_tokens``) and the last
    batch's head-averaged class-attention row or whole attention matrix (``needs``)."""

    def __init__(self, keep_tokens: bool, needs: frozenset[str]) -> None:
        super().__init__()
        self.keep_tokens, self.needs = keep_tokens, needs
        self.tokens: list[Tensor] = []
        self.last: Tensor | None = None

    def before(self, x: Tensor, state: TokenState, block: int) -> Tensor:
        if self.keep_tokens:
            self.tokens.append(x.cpu())
        return x

    def after_attn(self, x: Tensor, extras: AttentionExtras, state: TokenState, block: int) -> Tensor:
        self.last = extras.cls_attn.mean(dim=1) if "cls_attn" in self.needs else extras.attention
        return x


def random_views(images: Tensor, count: int, mean: Sequence[float] | None, std: Sequence[float] | None,
                 generator: torch.Generator) -> list[Tensor]:
    """``count`` random views of preprocessed ``images`` ``(B, C, H, W)``: per image a random resized crop
    (35-100% of the area, aspect 3/4-4/3) back to ``(H, W)``, a flip with probability 1/2 and brightness /
    contrast jitter of up to 30% (in pixel space: ``mean`` / ``std`` undo the normalisation; None where the
    model's preprocessing is unknown: the jitter then works on the tensors as they are, unclipped)."""
    B, C, H, W = images.shape
    known = mean is not None and std is not None
    m = torch.tensor(mean if known else [0.0] * C, dtype=images.dtype, device=images.device).view(1, C, 1, 1)
    s = torch.tensor(std if known else [1.0] * C, dtype=images.dtype, device=images.device).view(1, C, 1, 1)
    views = []
    for _ in range(count):
        out = []
        for img in images:
            u = torch.rand(6, generator=generator).tolist()
            area = H * W * (0.35 + 0.65 * u[0])
            aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
            h = min(H, max(1, round(math.sqrt(area / aspect))))
            w = min(W, max(1, round(math.sqrt(area * aspect))))
            top, left = int(u[2] * (H - h + 1)), int(u[3] * (W - w + 1))
            crop = F.interpolate(img[None, :, top:top + h, left:left + w], size=(H, W), mode="bilinear",
                                 align_corners=False, antialias=True)[0]
            out.append(crop.flip(-1) if u[4] < 0.5 else crop)
        batch = torch.stack(out) * s + m
        jitter = torch.rand(2, B, 1, 1, 1, generator=generator).to(images.device) * 0.6 + 0.7
        gray = batch.mean(dim=(1, 2, 3), keepdim=True)
        batch = (batch * jitter[0] - gray) * jitter[1] + gray
        batch = batch.clamp(0, 1) if known else batch
        views.append((batch - m) / s)
    return views


def _normalisation(model: nn.Module) -> tuple[Sequence[float] | None, Sequence[float] | None]:
    """``model``'s input mean and std, or ``(None, None)`` where its preprocessing is unknown (a
    transformers model built from a config, not loaded with ``from_pretrained``)."""
    try:
        cfg = data_config(model)
    except TokenSparseError:
        return None, None
    return cfg["mean"], cfg["std"]


@torch.no_grad()
def cache_teacher(model: nn.Module, dataset: Dataset, locations: list[int], batch_size: int, flip: bool,
                  device: torch.device, num_workers: int = 0, imitation: bool = True,
                  progress: Callable[[int], None] | None = None, views: int = 0, target: str = "rollout",
                  seed: int = 0) -> TeacherCache:
    """Run the unreduced ``model`` once over every view of ``dataset``: each image, its mirror image if
    ``flip`` and ``views`` random views (:func:`random_views`).

    With ``imitation`` (token families with a class token), recording hooks keep each location's
    input tokens and the warm start's ``target`` scores there (removed again afterwards).
    """
    model.eval()
    family = get_family(model)
    start = min(locations)
    imitation = imitation and isinstance(family, TokenFamily) and family.has_class_token
    P = family.num_prefix if imitation else 0
    needs = frozenset({"attention" if target == "rollout" else "cls_attn"})
    recorded = range(start, len(family.blocks)) if target == "rollout" else locations
    recorders = {b: TeacherRecorder(b in locations, needs if b in recorded else frozenset())
                 for b in sorted({*locations, *recorded})}
    inputs, logits, tokens = [], [], []
    scores: dict[int, list[Tensor]] = {b: [] for b in locations}
    mean, std = _normalisation(model) if views else (None, None)
    generator = torch.Generator().manual_seed(mix_seed(seed, 17))
    if imitation:
        family.install(TokenState(num_prefix=P), recorders)
    try:
        for images, *_ in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            images = images.to(device)
            batch = [images, *([images.flip(-1)] if flip else [])]
            batch += random_views(images, views, mean, std, generator)
            for view in batch:
                if imitation:  # one full pass; the hooks keep what the warm start needs
                    feats = family.forward_features(view)
                    inputs.append(recorders[start].tokens[-1])
                    if target == "rollout":  # from the last location back: each rollout extends the next one's
                        flow = None
                        backwards = sorted(locations, reverse=True)
                        for b, end in zip(backwards, [len(family.blocks), *backwards]):
                            part = attention_rollout([recorders[i].last for i in range(b, end)])
                            flow = part if flow is None else flow @ part
                            scores[b].append(flow[:, 0, P:].cpu())
                    else:
                        for b in locations:
                            scores[b].append(recorders[b].last[:, P:].cpu())
                else:
                    h = family.run_to(view, start)
                    inputs.append(h.cpu())
                    feats = family.features_from(h, start)
                if family.has_head:
                    logits.append(family.forward_head(feats).cpu())
                tokens.append(family.feature_tokens(feats).cpu())
            if progress is not None:
                progress(len(images))
    finally:
        if imitation:
            restore(model)
    stage_tokens = [torch.cat(recorders[b].tokens)[:, P:] for b in locations] if imitation else []
    stage_scores = [torch.cat(scores[b]) for b in locations] if imitation else []
    return TeacherCache(start, torch.cat(inputs), torch.cat(logits) if logits else None, torch.cat(tokens),
                        stage_tokens, stage_scores)


def imitate_teacher(stage_map: dict[int, dv.PredictionModule], cache: TeacherCache, epochs: int,
                    lr: float, batch_size: int, seed: int, device: torch.device,
                    progress: Callable[[int], None] | None = None) -> None:
    """Warm-start predictors: keep label = top-k of the teacher's target scores at each location."""
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
            if not torch.isfinite(loss.detach()):
                raise non_finite_error(
                    f"the warm-start (imitation) loss is not finite ({float(loss.detach()):.4g})", epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(1)


def non_finite_error(what: str, epoch: int) -> TokenSparseError:
    """The error that stops calibration when training diverges (nothing is written)."""
    return TokenSparseError(
        f"calibration stopped in epoch {epoch + 1}: {what}; no predictors were written; lower the learning rate "
        f"(--lr) or check the loss weights, the model's weights and the images")


def check_output_file(out: str | Path, what: str = "predictors", example: str = "predictors.safetensors") -> Path:
    """Before calibrating: ``out`` is not a folder and its folder is writable (created if missing);
    temporary files a killed write of ``out`` left there are removed."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise TokenSparseError(f"cannot write {what} {str(path)!r}: it is a folder; give a file name "
                               f"such as {str(path / example)!r}")
    check_writable_folder(path.parent, "output folder")
    remove_stale_temp_files(path.parent, (path.name,))
    return path


def forward_from(model: nn.Module, h: Tensor, start: int) -> Tensor:
    """Logits of a patched model run from block ``start`` on ``h`` (its final tokens for a model
    without a classification head); records its final tokens."""
    family = get_family(model)
    features = family.features_from(h, start)
    return family.forward_head(features) if family.has_head else features


def holdout_split(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """``(training, held-out)`` image indices: ``ceil(share * n)`` random images held out when ``share`` > 0
    and ``n`` >= 10 (else none)."""
    if share <= 0 or n < 10:
        return list(range(n)), []
    order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, 23))).tolist()
    k = math.ceil(share * n)
    return sorted(order[k:]), sorted(order[:k])


@torch.no_grad()
def held_out_distance(model: nn.Module, cache: TeacherCache, batch_size: int, device: torch.device) -> float:
    """How far the reduced ``model`` (eval mode: really pruned) is from the teacher on ``cache``: mean
    KL of the logits, or the MSE of the final tokens for a model without a classification head."""
    model.eval()
    family = get_family(model)
    total = 0.0
    for i in range(0, len(cache), batch_size):
        out = forward_from(model, cache.inputs[i:i + batch_size].to(device), cache.start)
        if cache.logits is not None:
            total += float(logit_distillation(out, cache.logits[i:i + batch_size].to(device))) * len(out)
        else:
            tokens = family.feature_tokens(out)
            total += float((tokens.float() - cache.tokens[i:i + batch_size].to(device).float()).pow(2).mean()) * len(out)
    return total / len(cache)


def calibrate_dynamicvit(model: nn.Module, dataset: Dataset, method: str = "dynamicvit",
              config: CalibrateConfig | None = None, out: str | Path | None = None,
              progress: bool = True, device: str = "cpu") -> nn.Module:
    """Train DynamicViT's new parts for ``model`` by distillation from its unreduced self.

    ``model``: an unpatched timm ViT, ConvNeXt or Swin classifier or transformers vision model with
    trained weights (patched here with ``method``, e.g. ``"dynamicvit:rho=0.7"``), or one already
    patched with ``dynamicvit``. ``dataset`` items are ``(image tensor, anything)``: labels are
    not used (:func:`tokensparse.data.image_dataset` with ``labelled=False`` reads any folder;
    :func:`tokensparse.data.drop_unreadable` leaves out files that do not decode). A transformers
    model without a classification head (``ViTModel``, ``CLIPVisionModel``, ...) is distilled on
    its final tokens alone (the logit KL needs logits; ``token_weight`` > 0). Writes the learned
    parts to ``out`` (safetensors) if given; its folder is checked to be writable before any
    work. Returns the patched model in eval mode, with the predictors (and fast paths) of the
    epoch closest to the teacher on the held-out images (:class:`CalibrateConfig`).

    A non-finite loss stops calibration with a TokenSparseError, and nothing is written.
    """
    cfg = config or CalibrateConfig()
    cfg.validate()
    dev = resolve_device(device)
    if out is not None:
        out = check_output_file(out)
    if is_patched(model):
        locations = sorted(dv.prediction_modules(model))
        base = Teacher(model).model
    else:
        locations = sorted(method_plan(model, method))
        base = model
    if len(dataset) == 0:
        raise TokenSparseError("calibration needs at least one image")
    if not get_family(base).has_head and cfg.epochs > 0 and not cfg.token_weight:
        raise TokenSparseError(f"this {type(base).__name__} has no classification head, so calibration distils its "
                               f"final tokens: token_weight must be > 0, got {cfg.token_weight!r}")
    base.to(dev)
    seed_everything(cfg.seed)
    train_idx, held_idx = holdout_split(len(dataset), cfg.holdout, cfg.seed)
    with progress_bar("teacher", len(dataset), progress) as advance:
        cache = cache_teacher(base, Subset(dataset, train_idx), locations, cfg.batch_size, cfg.flip, dev,
                              cfg.num_workers, cfg.imitation_epochs > 0, advance, cfg.views, cfg.imitation_target,
                              cfg.seed)
        held = cache_teacher(base, Subset(dataset, held_idx), locations, cfg.batch_size, False, dev,
                             cfg.num_workers, False, advance) if held_idx else None
    if not is_patched(model):
        patch(model, method)
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
            imitate_teacher(stage_map, cache, cfg.imitation_epochs, cfg.imitation_lr, cfg.batch_size, cfg.seed, dev,
                            advance)
        cache.stage_tokens, cache.stage_scores = [], []
    best = (held_out_distance(model, held, cfg.batch_size, dev), copy.deepcopy(dv.learned_state(model))) \
        if held is not None else None
    n = len(cache)
    optimizer, scheduler, per_epoch = adamw_schedule(params, cfg, n)
    total = per_epoch * cfg.epochs
    ratio_weight = dv.default_ratio_weight(model) if cfg.ratio_weight is None else cfg.ratio_weight
    distill_weight = cfg.distill_weight if cache.logits is not None else 0.0
    loss_fn = DynamicViTLoss(ratio_weight, distill_weight, cfg.token_weight, ce_weight=0.0)
    step = 0
    try:
        with progress_bar("calibrate", total, progress) as advance:
            for epoch in range(cfg.epochs):
                for s in stage_map.values():
                    s.train()
                order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(cfg.seed, epoch)))
                for i in range(0, n, cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    seed_everything(mix_seed(cfg.seed, step, 11))
                    logits = forward_from(model, cache.inputs[idx].to(dev), start)
                    outputs = dv.train_outputs(model)
                    teacher = None if cache.logits is None else cache.logits[idx].to(dev)
                    loss, parts = loss_fn(logits, None, outputs, teacher, cache.tokens[idx].to(dev))
                    if not torch.isfinite(loss.detach()):
                        shown = ", ".join(f"{k} {float(v):.4g}" for k, v in parts.items() if k != "ce")
                        raise non_finite_error(f"the loss is not finite ({float(loss.detach()):.4g}: {shown})", epoch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    advance(1)
                if held is not None:
                    distance = held_out_distance(model, held, cfg.batch_size, dev)
                    if distance < best[0]:
                        best = (distance, copy.deepcopy(dv.learned_state(model)))
    finally:
        model.eval()
        model.requires_grad_(True)
    if best is not None:
        dv.load_learned_state(model, best[1])
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise non_finite_error("the learned parameters are not finite after the last update", max(cfg.epochs - 1, 0))
    if out is not None:
        dv.save_predictors(model, out)
    return model


def method_plan(model: nn.Module, method: str) -> dict[int, float]:
    """``{block: keep ratio}`` that ``method`` (a dynamicvit spec) gives ``model``; clear error otherwise."""
    name, options = parse_spec(method)
    if name != "dynamicvit":
        raise TokenSparseError(f"calibration supports the learned method 'dynamicvit', got {name!r}")
    method_obj = dv.DynamicViT(**options)
    family = get_family(model)
    if not method_obj.supports_family(type(family)):
        raise TokenSparseError(f"method 'dynamicvit' does not support {family.name} models; it supports: "
                               f"{', '.join(supported_families(dv.DynamicViT))}")
    if not family.has_head and not isinstance(family, TokenFamily):
        raise TokenSparseError("calibration needs a full classifier (with its head), not a features_only model")
    return method_obj.plan(family)

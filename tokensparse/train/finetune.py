"""Fine-tuning a DynamicViT model (predictors + backbone), single process or ``torchrun`` DDP.

Reproducibility and exact resume: the data order comes from ``DistributedSampler`` seeded
by ``(seed, epoch)``; every sample's augmentation is seeded by ``(seed, epoch, index)`` and
every step's Gumbel/dropout noise by ``(seed, step, rank)``. A resumed run therefore skips
the consumed batches without loading them and continues bit-for-bit like an uninterrupted one.

Checkpoints (``<out>/checkpoint.pt``) are one ``torch.save`` file holding only tensors and
plain Python values (model and predictors state dict, AdamW and LR-scheduler state, epoch,
step, RNG state, config, and a sha256 checksum of all of it), loadable with
``weights_only=True``; they are written atomically (:func:`tokensparse.utils.atomic_write`),
so a crash never leaves a half-written one (temporary files a kill leaves behind are removed
when the next run starts), and :func:`load_checkpoint` verifies the checksum, so a damaged
file is a clear error, never silently resumed from. Trained predictors also go to
``<out>/predictors.safetensors`` after every epoch. Nothing non-finite is ever written: a
non-finite loss (or parameters) stops training with a clear error, keeping the last good
checkpoint.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..api import is_patched, patch
from ..errors import TokenSparseError
from ..families import get_family
from ..methods import dynamicvit as dv
from ..models import describe_load_error
from ..spec import parse_spec
from ..utils import atomic_write, check_writable_folder, output_logits, progress_bar, remove_stale_temp_files
from .config import LearningConfig, check_bool, check_int, check_number
from .losses import DynamicViTLoss, Teacher

CHECKPOINT = "checkpoint.pt"
PREDICTORS = "predictors.safetensors"
CHECKPOINT_VERSION = 2
"""2: with a ``checksum`` (version 1 files, without one, still load)."""

#: options whose change on resume rebuilds the learning-rate schedule (see :func:`finetune_dynamicvit`)
SCHEDULE_OPTIONS = ("epochs", "lr", "warmup_epochs", "min_lr", "backbone_lr_scale", "weight_decay")
#: options that fix the data order: a resume must keep them (and the number of processes)
ORDER_OPTIONS = ("batch_size", "seed")


@dataclass(kw_only=True)
class TrainConfig(LearningConfig):
    """Fine-tuning options; defaults follow the DynamicViT authors' recipe (lr scaled to the batch).

    Shared options: :class:`~tokensparse.train.config.LearningConfig`. ``backbone_lr_scale``:
    backbone lr = ``lr`` x this (0 freezes the backbone). ``ce_weight``: cross-entropy weight.
    ``clip_grad``: gradient norm clipping (None: off). ``bf16``: bf16 autocast.
    ``checkpoint_every``: also checkpoint every N steps. ``max_steps``: stop early (tests,
    smoke runs).
    """
    backbone_lr_scale: float = 0.01
    ce_weight: float = 1.0
    clip_grad: float | None = None
    bf16: bool = False
    checkpoint_every: int | None = None
    max_steps: int | None = None

    def validate(self) -> None:
        super().validate()
        check_number(self, "backbone_lr_scale", "ce_weight")
        if self.clip_grad is not None:
            check_number(self, "clip_grad")
        check_bool(self, "bf16")
        check_int(self, "checkpoint_every", 1, optional=True)
        check_int(self, "max_steps", 1, optional=True)
        self.check_some_loss(ce_weight=self.ce_weight)


# ----------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) job."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> DistInfo:
    """Join the ``torchrun`` process group if launched by it (nccl on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev)
    return DistInfo(device=dev)


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- data

def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (deterministic, order-sensitive)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def seed_everything(seed: int) -> None:
    """Seed torch, Python's ``random`` and numpy (timm transforms use all three).

    Not ``timm.utils.random_seed``: that passes the seed to numpy unchanged, which rejects the
    63-bit seeds of :func:`mix_seed`; numpy gets ``seed mod 2**32`` here.
    """
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


class SeededDataset(Dataset):
    """Wraps a dataset so item ``i`` of epoch ``e`` is augmented with seed ``(seed, e, i)``."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        seed_everything(mix_seed(self.seed, self.epoch, index))
        return self.dataset[index]


def epoch_batches(n: int, info: DistInfo, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches of dataset indices for ``epoch`` (full batches only)."""
    sampler = DistributedSampler(range(n), num_replicas=info.world, rank=info.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    return [idx[i:i + batch_size] for i in range(0, len(idx) - batch_size + 1, batch_size)]


# ----------------------------------------------------------------------------- optimisation

class WarmupCosine:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine down to ``floor``."""

    def __init__(self, warmup: int, total: int, floor: float = 0.0) -> None:
        self.warmup, self.total, self.floor = int(warmup), int(total), float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def adamw_schedule(params: list[nn.Parameter], cfg: LearningConfig, n: int) -> tuple[
        torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR, int]:
    """AdamW on ``params`` at ``cfg.lr`` with ``cfg.warmup_epochs`` of warm-up then a cosine decay to
    ``cfg.min_lr`` over ``cfg.epochs`` epochs of ``n`` items; returns the optimiser, the scheduler
    (stepped once per batch) and the batches per epoch."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = max(1, -(-n // cfg.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(round(cfg.warmup_epochs * per_epoch), per_epoch * cfg.epochs, cfg.min_lr / cfg.lr))
    return optimizer, scheduler, per_epoch


class _NamedParameters:
    """Some of a model's ``(name, parameter)`` pairs, shaped as timm's
    :func:`~timm.optim.param_groups_weight_decay` reads a model."""

    def __init__(self, named: Iterable[tuple[str, nn.Parameter]]) -> None:
        self.named = list(named)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self.named)


def param_groups(model: nn.Module, lr: float, backbone_lr_scale: float, weight_decay: float) -> list[dict]:
    """AdamW groups: DynamicViT's new parts at ``lr``, backbone at ``lr * backbone_lr_scale``.

    Each part is split by timm's ``param_groups_weight_decay`` (no decay on 1-d parameters and
    biases), so the groups are, in this order: new parts without / with decay, backbone
    without / with decay (empty groups and a frozen backbone left out); parameters keep the
    model's order. Trainable parameters only.
    """
    new = {id(p) for p in dv.learned_parameters(model)}
    named = list(model.named_parameters())
    out = []
    for params, scale in (([(n, p) for n, p in named if id(p) in new], 1.0),
                          ([(n, p) for n, p in named if id(p) not in new], backbone_lr_scale)):
        if scale == 0:
            continue
        for group in param_groups_weight_decay(_NamedParameters(params), weight_decay):  # type: ignore[arg-type]
            out.append({**group, "lr": lr * scale})
    return out


# ----------------------------------------------------------------------------- checkpoints

def payload_digest(payload: dict[str, Any]) -> str:
    """sha256 (hex) of a checkpoint payload: every tensor's dtype, shape and bytes and every
    other value, in the payload's order, the ``checksum`` entry left out.

    The same after a ``torch.save`` / ``torch.load`` round trip; a changed byte anywhere in
    the values changes it.
    """
    h = hashlib.sha256()
    _feed_digest(h, {k: v for k, v in payload.items() if k != "checksum"})
    return h.hexdigest()


def _feed_digest(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(f"dict {len(value)};".encode())
        for k, v in value.items():
            _feed_digest(h, k)
            _feed_digest(h, v)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__} {len(value)};".encode())
        for v in value:
            _feed_digest(h, v)
    else:
        h.update(f"{type(value).__name__} {value!r};".encode())


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, epoch: int, step_in_epoch: int, global_step: int,
                    config: TrainConfig, world: int) -> Path:
    """Write a resumable checkpoint atomically (see the module docstring for its content)."""
    path = Path(path)
    module = getattr(model, "module", model)
    payload = {
        "version": CHECKPOINT_VERSION,
        "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
        "world_size": world, "config": asdict(config),
        "rng_torch": torch.get_rng_state(),
    }
    payload["checksum"] = payload_digest(payload)
    return atomic_write(path, lambda f: torch.save(payload, f), what="checkpoint")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; clear error if missing or corrupt
    (unreadable, truncated, or its content does not match its checksum)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TokenSparseError(f"checkpoint {str(p)!r} not found")
    try:
        payload = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt / foreign file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TokenSparseError(
            f"checkpoint {str(p)!r} is truncated or corrupt and cannot be resumed from ({first[:200]})") from None
    needed = {"version", "model", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step"}
    if not isinstance(payload, dict) or not needed <= set(payload):
        raise TokenSparseError(f"{str(p)!r} is not a tokensparse training checkpoint")
    version = payload["version"]
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise TokenSparseError(f"checkpoint {str(p)!r} has format version {version!r}; this tokensparse reads "
                               f"versions up to {CHECKPOINT_VERSION} (upgrade tokensparse)")
    if (version >= 2 or "checksum" in payload) and payload.get("checksum") != payload_digest(payload):
        raise TokenSparseError(
            f"checkpoint {str(p)!r} is corrupt: its content does not match the checksum stored when it was "
            f"written (damaged on disk or in a copy); it cannot be resumed from")
    return payload


# ----------------------------------------------------------------------------- the loop

StepCallback = Callable[[int, dict[str, float]], None]


def _describe(parts: dict[str, float], keep: Sequence[float], lr: float) -> str:
    loss = " ".join(f"{k} {v:.3f}" for k, v in parts.items())
    return f"{loss} | keep {' '.join(f'{r:.2f}' for r in keep)} | lr {lr:.2e}"


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _prepare(model: nn.Module, method: str) -> tuple[nn.Module, Teacher]:
    """Patch ``model`` with ``method`` (unless it already is dynamicvit) and build the teacher."""
    if is_patched(model):
        dv.prediction_modules(model)  # error unless it is dynamicvit
        return model, Teacher(model)
    name, _ = parse_spec(method)
    if name != "dynamicvit":
        raise TokenSparseError(f"training supports the learned method 'dynamicvit', got {name!r}")
    if not get_family(model).has_head:
        raise TokenSparseError(f"training needs a classifier (its cross-entropy needs logits); this "
                               f"{type(model).__name__} has no classification head")
    teacher = Teacher(model)
    return patch(model, method), teacher


def _on_main(info: DistInfo, check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 only; a TokenSparseError it raises is raised on every rank."""
    message = None
    if info.main:
        try:
            check()
        except TokenSparseError as exc:
            message = str(exc)
    if info.world > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise TokenSparseError(message if info.main else f"(rank 0) {message}")


def _all_ranks(info: DistInfo, ok: torch.Tensor) -> bool:
    """Whether the boolean tensor ``ok`` is True on every rank (one tiny all-reduce under DDP)."""
    if info.world > 1:
        flag = ok.to(device=info.device, dtype=torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)
    return bool(ok)


def _finite_parameters(model: nn.Module) -> torch.Tensor:
    """A boolean tensor: every parameter of ``model`` is finite."""
    return torch.stack([torch.isfinite(p.detach()).all() for p in model.parameters()]).all()


def prepare_output(out: Path, resume_from: Path | None, overwrite: bool) -> None:
    """Before any training: the output folder is writable (created if missing), an existing
    checkpoint there is resumed or explicitly overwritten, and temporary files that a killed
    checkpoint / predictors write left there are removed."""
    existing = out / CHECKPOINT
    if existing.is_file() and not overwrite and (
            resume_from is None or resume_from.resolve() != existing.resolve()):
        raise TokenSparseError(
            f"{str(existing)!r} already holds a training checkpoint; continue it with --resume (resume=True) or "
            f"start over with --overwrite (overwrite=True), which replaces it")
    check_writable_folder(out, "output folder")
    remove_stale_temp_files(out, (CHECKPOINT, PREDICTORS))


def _schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, per_epoch: int,
              done: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine over ``cfg.epochs`` for the groups' ``initial_lr``, ``done`` steps in."""
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    rule = WarmupCosine(round(cfg.warmup_epochs * per_epoch), per_epoch * cfg.epochs, floor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, rule, last_epoch=done - 1)


def _resume_conflicts(ckpt: dict[str, Any], cfg: TrainConfig, world: int) -> None:
    """Clear error for a resume that cannot continue the checkpoint's run."""
    old = ckpt.get("config", {})
    order = {"processes": (ckpt.get("world_size", world), world),
             **{k: (old.get(k, getattr(cfg, k)), getattr(cfg, k)) for k in ORDER_OPTIONS}}
    if any(a != b for a, b in order.values()):
        raise TokenSparseError(
            "checkpoint was written with " + ", ".join(f"{k} {a}" for k, (a, _) in order.items())
            + "; resume with the same to keep the data order (got "
            + ", ".join(f"{k} {b}" for k, (_, b) in order.items()) + ")")
    before = old.get("backbone_lr_scale", cfg.backbone_lr_scale)
    if (before == 0) != (cfg.backbone_lr_scale == 0):
        raise TokenSparseError(
            f"checkpoint was written with backbone_lr_scale {before} and this run has {cfg.backbone_lr_scale}: "
            f"0 freezes the backbone, so the optimizer state does not carry over; resume with "
            f"{'0' if before == 0 else 'a value > 0'}")


def finetune_dynamicvit(model: nn.Module, dataset: Dataset, out_dir: str | Path, method: str = "dynamicvit",
             config: TrainConfig | None = None, resume: bool | str | Path = False,
             on_step: StepCallback | None = None, progress: bool = True,
             device: str | None = None, overwrite: bool = False) -> nn.Module:
    """Fine-tune ``model`` with DynamicViT on ``dataset`` (items ``(image tensor, label)``).

    ``model`` is an unpatched timm ViT (patched here with ``method``; a frozen copy is the
    teacher) or one already patched with ``dynamicvit``. Under ``torchrun`` this runs DDP
    (gloo on CPU, nccl on GPUs). ``on_step(global_step, loss_parts)`` runs after every
    optimiser step. Returns the model (patched, in eval mode).

    Output: ``out_dir`` must be writable (checked, and created, before anything is trained).
    If it already holds a checkpoint, the run refuses to start unless it resumes that
    checkpoint or ``overwrite=True`` (``--overwrite``) says to replace it. Temporary files a
    killed checkpoint write left in ``out_dir`` are removed.

    ``resume``: True for ``<out_dir>/checkpoint.pt``, or a checkpoint path. With the options
    the checkpoint was written with, the run continues bit-for-bit as if never stopped. The
    data order must stay the same: a different number of processes, ``batch_size`` or
    ``seed`` is refused. A different ``epochs``, ``lr``, ``warmup_epochs``, ``min_lr``,
    ``backbone_lr_scale`` or ``weight_decay`` rebuilds the learning-rate schedule (warm-up,
    then cosine to ``min_lr``) for the new options and horizon, continuing at the step the
    checkpoint reached (the weights and AdamW moments carry over; a note on stderr names the
    changes), instead of the old schedule (which, e.g., would run added epochs at the floor).
    Loss weights, ``clip_grad``, ``bf16``, ``checkpoint_every`` and ``max_steps`` simply take
    their new values.

    A non-finite loss (or non-finite parameters after an update) stops training with a
    TokenSparseError before anything of that step is applied or saved; the last good
    checkpoint and predictors stay as they were.
    """
    cfg = config or TrainConfig()
    cfg.validate()
    if not isinstance(overwrite, bool):
        raise TokenSparseError(f"overwrite must be True or False, got {overwrite!r}")
    if resume is True and overwrite:
        raise TokenSparseError("resume=True (--resume) continues the checkpoint in the output folder and "
                               "overwrite=True (--overwrite) replaces it: give one of them")
    info = setup_distributed(device)
    out = Path(out_dir).expanduser()
    resume_from = None if not resume else out / CHECKPOINT if resume is True else Path(resume).expanduser()
    _on_main(info, lambda: prepare_output(out, resume_from, overwrite))
    ckpt = load_checkpoint(resume_from) if resume_from is not None else None
    if ckpt is not None:
        _resume_conflicts(ckpt, cfg, info.world)
    seed_everything(cfg.seed)
    model, teacher = _prepare(model, method)
    model.to(info.device).train()
    teacher.to(info.device)
    net: nn.Module = model
    if info.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.backbone_lr_scale, cfg.weight_decay))
    per_epoch = len(epoch_batches(len(dataset), info, cfg.batch_size, cfg.seed, 0))
    if per_epoch == 0:
        raise TokenSparseError(
            f"{len(dataset)} images are fewer than one batch ({cfg.batch_size} per process x {info.world} "
            f"processes); lower the batch size")
    total = per_epoch * cfg.epochs
    scheduler = _schedule(optimizer, cfg, per_epoch)
    ratio_weight = dv.default_ratio_weight(model) if cfg.ratio_weight is None else cfg.ratio_weight
    loss_fn = DynamicViTLoss(ratio_weight, cfg.distill_weight, cfg.token_weight, cfg.ce_weight)
    epoch, skip, step = 0, 0, 0
    saved: int | None = None  # global step of the last checkpoint in ``out`` this run continues or wrote
    if ckpt is not None:
        fresh = [(g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TokenSparseError(f"checkpoint does not fit this model or method: {describe_load_error(exc)}") from None
        epoch, skip, step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        old = ckpt.get("config", {})
        changed = {k: (old[k], getattr(cfg, k)) for k in SCHEDULE_OPTIONS if k in old and old[k] != getattr(cfg, k)}
        if not changed:
            scheduler.load_state_dict(ckpt["scheduler"])
        else:  # the new options' schedule, ``step`` steps in
            for group, (lr, weight_decay) in zip(optimizer.param_groups, fresh):
                group["initial_lr"], group["weight_decay"] = lr, weight_decay
            scheduler = _schedule(optimizer, cfg, per_epoch, done=step)
            if progress and info.main:
                print("note: resuming with " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
                      + f": learning-rate schedule rebuilt for them from step {step}", file=sys.stderr)
        torch.set_rng_state(ckpt["rng_torch"])
        if resume_from is not None and resume_from.resolve() == (out / CHECKPOINT).resolve():
            saved = step
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    stop = total if cfg.max_steps is None else min(total, cfg.max_steps)

    def stopped(at: int, what: str) -> TokenSparseError:
        kept = (f"the last good checkpoint, {str(out / CHECKPOINT)!r} (step {saved}), is kept" if saved is not None
                else "no checkpoint was written by this run")
        return TokenSparseError(
            f"training stopped at step {at} (epoch {(at - 1) // per_epoch + 1}): {what}; nothing from it was saved "
            f"and {kept}; lower the learning rate (--lr) or check the loss weights, weights and images")

    def checkpoint(ep: int, in_epoch: int) -> None:
        nonlocal saved
        if not _all_ranks(info, _finite_parameters(model)):
            raise stopped(step, "the parameters are not finite after the last update")
        if info.main:
            save_checkpoint(out / CHECKPOINT, net, optimizer, scheduler, ep, in_epoch, step, cfg, info.world)
        saved = step
        barrier(info)

    with progress_bar("train", stop, progress and info.main, completed=min(step, stop), transient=False) as advance:
        while epoch < cfg.epochs and step < stop:
            batches = epoch_batches(len(dataset), info, cfg.batch_size, cfg.seed, epoch)[skip:]
            loader = DataLoader(SeededDataset(dataset, cfg.seed, epoch), batch_sampler=batches,
                                num_workers=cfg.num_workers, persistent_workers=False)
            in_epoch = skip
            for images, labels in loader:
                seed_everything(mix_seed(cfg.seed, step, info.rank, 7))
                images, labels = images.to(info.device), labels.to(info.device)
                with autocast:
                    t_logits, t_tokens = teacher(images)
                    logits = output_logits(net(images))
                    outputs = dv.train_outputs(model)
                    loss, parts = loss_fn(logits, labels, outputs, t_logits, t_tokens)
                if not _all_ranks(info, torch.isfinite(loss.detach())):
                    shown = ", ".join(f"{k} {float(v):.4g}" for k, v in parts.items())
                    raise stopped(step + 1, f"the loss is not finite ({float(loss.detach()):.4g}: {shown}), "
                                            f"so the step was not applied")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                scheduler.step()
                step += 1
                in_epoch += 1
                values = {k: float(v) for k, v in parts.items()}
                advance(1, _describe(values, outputs.keep_ratios, optimizer.param_groups[0]["lr"]))
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and in_epoch < per_epoch:
                    checkpoint(epoch, in_epoch)
                if on_step is not None:
                    on_step(step, values)
                if step >= stop:
                    break
            if in_epoch >= per_epoch:
                epoch, skip = epoch + 1, 0
                checkpoint(epoch, 0)
                if info.main:
                    dv.save_predictors(model, out / PREDICTORS)
            else:
                checkpoint(epoch, in_epoch)
                skip = in_epoch
    if info.main:
        dv.save_predictors(model, out / PREDICTORS)
    barrier(info)
    return model.eval()

"""Fine-tuning a DynamicViT model (predictors + backbone), single process or ``torchrun`` DDP.

Reproducibility and exact resume: the data order comes from ``DistributedSampler`` seeded
by ``(seed, epoch)``; every sample's augmentation is seeded by ``(seed, epoch, index)`` and
every step's Gumbel/dropout noise by ``(seed, step, rank)``. A resumed run therefore skips
the consumed batches without loading them and continues bit-for-bit like an uninterrupted one.

Checkpoints (``<out>/checkpoint.pt``) are one ``torch.save`` file holding only tensors and
plain Python values (model and predictors state dict, AdamW and LR-scheduler state, epoch,
step, RNG state, config), loadable with ``weights_only=True``; they are written to a temp
file and moved into place with ``os.replace``, so a crash never leaves a half-written one.
Trained predictors also go to ``<out>/predictors.safetensors`` after every epoch.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..errors import TokenSparseError
from ..methods import dynamicvit as dv
from .losses import DynamicViTLoss, Teacher

CHECKPOINT = "checkpoint.pt"
PREDICTORS = "predictors.safetensors"
CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """Fine-tuning options; defaults follow the DynamicViT authors' recipe (lr scaled to the batch).

    ``batch_size`` is per process. ``lr`` is the learning rate of DynamicViT's new parts
    (predictors, and fast paths in ConvNeXt / Swin); ``backbone_lr_scale``: backbone lr =
    ``lr`` x this (0 freezes the backbone). ``ratio_weight`` None: the authors' weight for the
    model (2.0 for ViTs, 10.0 for ConvNeXt / Swin). ``checkpoint_every``: also checkpoint every N steps.
    ``max_steps``: stop early (tests, smoke runs).
    """
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    backbone_lr_scale: float = 0.01
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6
    ratio_weight: Optional[float] = None
    distill_weight: float = 0.5
    token_weight: float = 0.5
    ce_weight: float = 1.0
    clip_grad: Optional[float] = None
    bf16: bool = False
    seed: int = 0
    num_workers: int = 2
    checkpoint_every: Optional[int] = None
    max_steps: Optional[int] = None

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TokenSparseError(f"{name} must be a positive integer, got {v!r}")
        if self.ratio_weight is not None and (isinstance(self.ratio_weight, bool) or not isinstance(
                self.ratio_weight, (int, float)) or self.ratio_weight < 0):
            raise TokenSparseError(f"ratio_weight must be a number >= 0, got {self.ratio_weight!r}")
        for name in ("lr", "backbone_lr_scale", "weight_decay", "warmup_epochs", "min_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                raise TokenSparseError(f"{name} must be a number >= 0, got {v!r}")
        for name in ("checkpoint_every", "max_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise TokenSparseError(f"{name} must be a positive integer, got {v!r}")


# ----------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) job."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str] = None) -> DistInfo:
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

def split_dataset(dataset: Dataset, split: str = "all") -> Dataset:
    """``all``, or the ``even`` / ``odd`` positions of the dataset's (sorted) sample list."""
    if split == "all":
        return dataset
    if split not in ("even", "odd"):
        raise TokenSparseError(f"split must be all, even or odd; got {split!r}")
    return Subset(dataset, range(0 if split == "even" else 1, len(dataset), 2))


def image_dataset(images: str | Path, model: nn.Module, wnids: str | Path | None = None,
                  training: bool = True, split: str = "all") -> Dataset:
    """An :class:`ImageNetFolder` (either layout) with the model's timm train or eval transforms."""
    import timm.data
    from ..measure import ImageNetFolder
    cfg = timm.data.resolve_data_config({}, model=model)
    if training:
        transform = timm.data.create_transform(
            input_size=cfg["input_size"], is_training=True, interpolation=cfg["interpolation"],
            mean=cfg["mean"], std=cfg["std"])
    else:
        transform = timm.data.create_transform(**cfg)
    return split_dataset(ImageNetFolder(images, wnids, transform=transform), split)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (deterministic, order-sensitive)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def seed_everything(seed: int) -> None:
    """Seed torch, Python's ``random`` and numpy (timm transforms use all three)."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % (1 << 32))
    except ImportError:  # pragma: no cover
        pass


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


def param_groups(model: nn.Module, lr: float, backbone_lr_scale: float, weight_decay: float) -> list[dict]:
    """AdamW groups: DynamicViT's new parts at ``lr``, backbone at ``lr * backbone_lr_scale``; no decay on 1-d params."""
    pred = {id(p) for p in dv.learned_parameters(model)}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((id(p) in pred, p.ndim <= 1), []).append(p)
    out = []
    for (is_pred, no_decay), params in sorted(groups.items(), reverse=True):
        scale = 1.0 if is_pred else backbone_lr_scale
        if scale == 0:
            continue
        out.append({"params": params, "lr": lr * scale, "weight_decay": 0.0 if no_decay else weight_decay})
    return out


# ----------------------------------------------------------------------------- checkpoints

def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace`` onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    try:
        atomic_torch_save(payload, path)
    except OSError as exc:
        raise TokenSparseError(f"cannot write checkpoint {str(path)!r}: {exc.strerror or exc}") from None
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; clear error if missing or corrupt."""
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
    return payload


# ----------------------------------------------------------------------------- the loop

StepCallback = Callable[[int, dict[str, float]], None]


@contextlib.contextmanager
def _progress(enabled: bool, total: int, done: int) -> Iterator[Callable[[str], None]]:
    """A rich progress bar on stderr; yields ``update(text)`` that advances one step."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), console=Console(stderr=True), disable=not enabled) as bar:
        task = bar.add_task("train", total=total, completed=done, info="")
        yield lambda text: bar.update(task, advance=1, info=text)


def _describe(parts: dict[str, float], keep: Sequence[float], lr: float) -> str:
    loss = " ".join(f"{k} {v:.3f}" for k, v in parts.items())
    return f"{loss} | keep {' '.join(f'{r:.2f}' for r in keep)} | lr {lr:.2e}"


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _prepare(model: nn.Module, method: str) -> tuple[nn.Module, Teacher]:
    """Patch ``model`` with ``method`` (unless it already is dynamicvit) and build the teacher."""
    import tokensparse
    from ..spec import parse_spec
    if tokensparse.is_patched(model):
        dv.prediction_modules(model)  # error unless it is dynamicvit
        return model, Teacher(model)
    name, _ = parse_spec(method)
    if name != "dynamicvit":
        raise TokenSparseError(f"training supports the learned method 'dynamicvit', got {name!r}")
    teacher = Teacher(model)
    return tokensparse.patch(model, method), teacher


def finetune(model: nn.Module, dataset: Dataset, out_dir: str | Path, method: str = "dynamicvit",
             config: Optional[TrainConfig] = None, resume: bool | str | Path = False,
             on_step: Optional[StepCallback] = None, progress: bool = True,
             device: Optional[str] = None) -> nn.Module:
    """Fine-tune ``model`` with DynamicViT on ``dataset`` (items ``(image tensor, label)``).

    ``model`` is an unpatched timm ViT (patched here with ``method``; a frozen copy is the
    teacher) or one already patched with ``dynamicvit``. Under ``torchrun`` this runs DDP
    (gloo on CPU, nccl on GPUs). ``resume``: True for ``<out_dir>/checkpoint.pt`` or a path.
    ``on_step(global_step, loss_parts)`` runs after every optimiser step. Returns the model
    (patched, in eval mode).
    """
    cfg = config or TrainConfig()
    cfg.validate()
    info = setup_distributed(device)
    out = Path(out_dir).expanduser()
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
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(round(cfg.warmup_epochs * per_epoch), total, floor))
    ratio_weight = dv.default_ratio_weight(model) if cfg.ratio_weight is None else cfg.ratio_weight
    loss_fn = DynamicViTLoss(ratio_weight, cfg.distill_weight, cfg.token_weight, cfg.ce_weight)
    epoch, skip, step = 0, 0, 0
    if resume:
        ckpt = load_checkpoint(out / CHECKPOINT if resume is True else resume)
        if ckpt.get("world_size", info.world) != info.world or \
                ckpt.get("config", {}).get("batch_size", cfg.batch_size) != cfg.batch_size:
            raise TokenSparseError(
                f"checkpoint was written by {ckpt.get('world_size')} process(es) with batch size "
                f"{ckpt['config'].get('batch_size')}; resume with the same to keep the data order")
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TokenSparseError(f"checkpoint does not fit this model or method: {str(exc).splitlines()[0]}") from None
        scheduler.load_state_dict(ckpt["scheduler"])
        epoch, skip, step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        torch.set_rng_state(ckpt["rng_torch"])
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    stop = total if cfg.max_steps is None else min(total, cfg.max_steps)

    def checkpoint(ep: int, in_epoch: int) -> None:
        if info.main:
            save_checkpoint(out / CHECKPOINT, net, optimizer, scheduler, ep, in_epoch, step, cfg, info.world)
        barrier(info)

    with _progress(progress and info.main, stop, min(step, stop)) as update:
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
                    logits = net(images)
                    outputs = dv.train_outputs(model)
                    loss, parts = loss_fn(logits, labels, outputs, t_logits, t_tokens)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                scheduler.step()
                step += 1
                in_epoch += 1
                values = {k: float(v) for k, v in parts.items()}
                update(_describe(values, outputs.keep_ratios, optimizer.param_groups[0]["lr"]))
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

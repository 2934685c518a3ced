"""Options shared by fine-tuning (:class:`~tokensparse.train.finetune.TrainConfig`) and
calibration (:class:`~tokensparse.train.calibrate.CalibrateConfig`), and their validation."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..errors import TokenSparseError


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(kw_only=True)
class LearningConfig:
    """What every DynamicViT training run needs; subclasses set their own defaults.

    ``batch_size`` is per process. ``lr`` is the learning rate of DynamicViT's new parts
    (predictors, and fast paths in ConvNeXt / Swin), with ``warmup_epochs`` of linear warm-up
    then a cosine decay to ``min_lr``. ``ratio_weight`` None: the authors' weight for the model
    (2.0 for ViTs, 10.0 for ConvNeXt / Swin); ``distill_weight``: KL to the unreduced teacher's
    logits; ``token_weight``: MSE to its final kept tokens (feature map for ConvNeXt / Swin).
    ``num_workers``: data loader workers.
    """
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6
    ratio_weight: float | None = None
    distill_weight: float = 0.5
    token_weight: float = 0.5
    seed: int = 0
    num_workers: int = 2

    #: the smallest allowed ``epochs``
    min_epochs: ClassVar[int] = 1

    def validate(self) -> None:
        """TokenSparseError naming the first bad option and what it must be (subclasses add theirs)."""
        check_int(self, "epochs", self.min_epochs)
        check_int(self, "batch_size", 1)
        check_int(self, "num_workers", 0)
        check_int(self, "seed", None)
        check_number(self, "lr", "weight_decay", "warmup_epochs", "min_lr", "distill_weight", "token_weight")
        if self.ratio_weight is not None:
            check_number(self, "ratio_weight")


def check_int(config: object, name: str, low: int | None, optional: bool = False) -> None:
    """``config.<name>`` must be an integer >= ``low`` (any integer if None; also None if ``optional``)."""
    value = getattr(config, name)
    if optional and value is None:
        return
    if not _is_int(value) or (low is not None and value < low):
        what = "an integer" if low is None else "a positive integer" if low == 1 else f"an integer >= {low}"
        raise TokenSparseError(f"{name} must be {what}, got {value!r}")


def check_number(config: object, *names: str) -> None:
    """Each ``config.<name>`` must be a finite number >= 0."""
    for name in names:
        value = getattr(config, name)
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise TokenSparseError(f"{name} must be a number >= 0, got {value!r}")

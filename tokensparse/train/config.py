"""Options shared by fine-tuning (:class:`~tokensparse.train.finetune.TrainConfig`) and
calibration (:class:`~tokensparse.train.calibrate.CalibrateConfig`), and their validation."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..errors import TokenSparseError

#: seeds must lie in ``[-SEED_LIMIT, SEED_LIMIT)`` (what ``torch.manual_seed`` takes)
SEED_LIMIT = 1 << 63


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
        """TokenSparseError naming the first bad option and what it must be (subclasses add theirs).

        Every number must be finite: ``lr``, ``weight_decay``, ``warmup_epochs``, ``min_lr`` and
        the loss weights >= 0, integers in their ranges (``seed`` within 64-bit range).
        """
        check_int(self, "epochs", self.min_epochs)
        check_int(self, "batch_size", 1)
        check_int(self, "num_workers", 0)
        check_int(self, "seed", -SEED_LIMIT, SEED_LIMIT - 1)
        check_number(self, "lr", "weight_decay", "warmup_epochs", "min_lr", "distill_weight", "token_weight")
        if self.ratio_weight is not None:
            check_number(self, "ratio_weight")

    def check_some_loss(self, **weights: float) -> None:
        """TokenSparseError unless some loss weight (``ratio_weight`` None counts as > 0) is > 0:
        with all of them 0 there is nothing to learn from."""
        weights = {"ratio_weight": 1.0 if self.ratio_weight is None else self.ratio_weight,
                   "distill_weight": self.distill_weight, "token_weight": self.token_weight, **weights}
        if not any(weights.values()):
            raise TokenSparseError(f"at least one loss weight must be > 0, got {', '.join(f'{k}=0' for k in weights)}")


def check_int(config: object, name: str, low: int | None, high: int | None = None, optional: bool = False) -> None:
    """``config.<name>`` must be an integer >= ``low`` (no bound if None) and <= ``high``
    (no bound if None); also None if ``optional``."""
    value = getattr(config, name)
    if optional and value is None:
        return
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        if high is not None:
            what = f"an integer from {low} to {high}" if low is not None else f"an integer <= {high}"
        else:
            what = "an integer" if low is None else "a positive integer" if low == 1 else f"an integer >= {low}"
        raise TokenSparseError(f"{name} must be {what}, got {value!r}")


def check_number(config: object, *names: str, positive: bool = False) -> None:
    """Each ``config.<name>`` must be a finite number >= 0 (> 0 if ``positive``)."""
    for name in names:
        value = getattr(config, name)
        if not _is_number(value) or not math.isfinite(value) or value < 0 or (positive and value == 0):
            what = "a number > 0" if positive else "a number >= 0"
            raise TokenSparseError(f"{name} must be {what} and finite, got {value!r}")


def check_bool(config: object, *names: str) -> None:
    """Each ``config.<name>`` must be True or False."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise TokenSparseError(f"{name} must be True or False, got {value!r}")

"""DynamicViT training objective: CE + ratio loss + distillation from the unreduced teacher."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import is_patched, unpatch
from ..errors import TokenSparseError
from ..families import get_family
from ..methods.dynamicvit import DynamicViTOutputs


def ratio_loss(masks: list[Tensor], targets: list[float]) -> Tensor:
    """``sum over locations of mean over images of (keep ratio - target)^2``."""
    return sum(((m.float().mean(dim=1) - t) ** 2).mean() for m, t in zip(masks, targets))


def logit_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """``KL(teacher || student)`` of the class distributions, averaged over images."""
    return F.kl_div(F.log_softmax(student.float(), dim=-1), F.log_softmax(teacher.float(), dim=-1),
                    reduction="batchmean", log_target=True)


def token_distillation(student: Tensor, teacher: Tensor, keep: Tensor | None = None) -> Tensor:
    """MSE of final tokens ``(B, N, C)`` over the kept ones (``keep`` ``(B, N)``; None: all).

    Averaged per image over its kept tokens, then over images, so the loss of a batch is the
    mean of its images' losses (a data-parallel run equals one big batch). With ``keep=None``
    this is feature-map distillation (ConvNeXt / Swin, where no position is dropped).
    """
    err = (student.float() - teacher.float()).pow(2).mean(dim=-1)
    if keep is None:
        return err.mean()
    keep = keep.float()
    return ((err * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)).mean()


class DynamicViTLoss(nn.Module):
    """The DynamicViT objective; every weight is an option (0 turns a part off; weights must be
    finite numbers >= 0, ``label_smoothing`` in [0, 1)).

    ``forward(logits, target, outputs, teacher_logits, teacher_tokens)`` returns the total
    loss and its detached parts ``{"ce", "ratio", "kl", "token"}``. ``target`` may be None
    (unlabelled calibration); ``outputs`` is :func:`tokensparse.methods.dynamicvit.train_outputs`.
    The ``token`` part is the MSE to the teacher's final kept patch tokens for a ViT, and to
    its final feature map for ConvNeXt / Swin (feature-map distillation). The authors weigh
    the ratio loss 2.0 for ViTs and 10.0 for ConvNeXt / Swin
    (:func:`~tokensparse.methods.dynamicvit.default_ratio_weight`).
    """

    def __init__(self, ratio_weight: float = 2.0, distill_weight: float = 0.5, token_weight: float = 0.5,
                 ce_weight: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        for name, w in (("ratio_weight", ratio_weight), ("distill_weight", distill_weight),
                        ("token_weight", token_weight), ("ce_weight", ce_weight)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise TokenSparseError(f"{name} must be a number >= 0 and finite, got {w!r}")
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
                or not 0 <= label_smoothing < 1:  # also rejects nan
            raise TokenSparseError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
        self.ratio_weight, self.distill_weight, self.token_weight = ratio_weight, distill_weight, token_weight
        self.ce_weight, self.label_smoothing = ce_weight, label_smoothing

    def forward(self, logits: Tensor, target: Tensor | None, outputs: DynamicViTOutputs,
                teacher_logits: Tensor | None = None, teacher_tokens: Tensor | None = None,
                ) -> tuple[Tensor, dict[str, Tensor]]:
        zero = logits.new_zeros((), dtype=torch.float32)
        parts = {"ce": zero, "ratio": zero, "kl": zero, "token": zero}
        if self.ce_weight and target is not None:
            parts["ce"] = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
        if self.ratio_weight:
            parts["ratio"] = ratio_loss(outputs.masks, outputs.targets)
        if self.distill_weight or self.token_weight:
            if (self.distill_weight and teacher_logits is None) or (self.token_weight and teacher_tokens is None):
                raise TokenSparseError("distillation weights are set but no teacher outputs were given")
            if self.distill_weight:
                parts["kl"] = logit_distillation(logits, teacher_logits)
            if self.token_weight:
                P = outputs.num_prefix
                keep = None if outputs.feature_mask is None else outputs.feature_mask.detach() > 0.5
                parts["token"] = token_distillation(outputs.features[:, P:], teacher_tokens[:, P:], keep)
        total = (self.ce_weight * parts["ce"] + self.ratio_weight * parts["ratio"]
                 + self.distill_weight * parts["kl"] + self.token_weight * parts["token"])
        return total, {k: v.detach() for k, v in parts.items()}


class Teacher(nn.Module):
    """A frozen copy of the unreduced model returning ``(logits, final tokens)``.

    Final tokens are ``(B, N, C)``: a ViT's ``forward_features`` output, or the positions of a
    ConvNeXt / Swin final feature map.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        if is_patched(self.model):
            unpatch(self.model)
        self.model.eval().requires_grad_(False)
        self.family = get_family(self.model)

    def train(self, mode: bool = True) -> Teacher:  # always eval
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.family.forward_features(x)
        return self.family.forward_head(features), self.family.feature_tokens(features)

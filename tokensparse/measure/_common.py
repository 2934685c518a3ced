"""Small helpers shared by the measurement modules."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import TokenSparseError
from ..utils import resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str) -> torch.dtype:
    """'fp32' or 'bf16' to a torch dtype; TokenSparseError otherwise."""
    if dtype not in DTYPES:
        raise TokenSparseError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def synchronize(device: torch.device) -> None:
    """Wait for queued work on an asynchronous device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measurement_device(device: str | torch.device) -> torch.device:
    """:func:`~tokensparse.utils.resolve_device` for running models on real data: also refuses
    ``meta`` (tensors without data: nothing can be timed or evaluated there)."""
    dev = resolve_device(device)
    if dev.type == "meta":
        raise TokenSparseError(f"device {str(device)!r} holds no data, so models cannot be timed or evaluated "
                               f"on it; use cpu, cuda (cuda:N) or mps")
    return dev


def check_finite_parameters(models: Mapping[str, nn.Module], labels: Mapping[str, str] | None = None) -> None:
    """TokenSparseError naming the model and its first tensor when a parameter or floating-point
    buffer of any of ``models`` holds NaN or inf (a corrupt weights or predictors file, or a
    diverged training run): such a model's numbers would mean nothing. ``labels``: how to name
    each model in the message (default: ``model 'NAME'``)."""
    for name, model in models.items():
        bad = [key for key, t in [*model.named_parameters(), *model.named_buffers()]
               if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())]
        if bad:
            label = (labels or {}).get(name, f"model {name!r}")
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise TokenSparseError(
                f"{label} has NaN or inf values in {bad[0]!r}{more}: its weights or learned parts (e.g. "
                f"a predictors file) are corrupt or come from a diverged training run; it cannot be measured")

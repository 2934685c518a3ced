"""Small helpers shared by the measurement modules."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import TokenSparseError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode, restoring each one's previous mode afterwards."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse a device string; TokenSparseError if malformed or unavailable."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TokenSparseError(f"bad device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TokenSparseError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise TokenSparseError(f"device {device!r} requested but MPS is not available")
    return dev


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


def positive_int(value: int, what: str) -> int:
    """Check ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TokenSparseError(f"{what} must be a positive integer, got {value!r}")
    return value


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True
                 ) -> Iterator[Callable[[int], None]]:
    """A transient rich progress bar on stderr (off unless a terminal); yields ``advance(n)``."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    with Progress(*columns, console=console, transient=True,
                  disable=not (enabled and console.is_terminal)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)

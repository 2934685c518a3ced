"""Throughput of several models timed interleaved in one process."""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import TokenSparseError
from ..utils import eval_mode, positive_int
from ._common import measurement_device, resolve_dtype, synchronize
from .flops import model_input_size

ProgressFn = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after every forward pass (warm-up included)."""


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (no-op for ``None``)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(positive_int(threads, "threads"))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _forward_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _timed_forward(model: nn.Module, x: torch.Tensor, device: torch.device,
                   dtype: torch.dtype) -> float:
    """Seconds for one synchronised forward pass."""
    synchronize(device)
    start = time.perf_counter()
    with _forward_context(device, dtype):
        model(x)
    synchronize(device)
    return time.perf_counter() - start


def _common_input_size(models: Mapping[str, nn.Module]) -> tuple[int, ...]:
    sizes = {name: model_input_size(m) for name, m in models.items()}
    if len(set(sizes.values())) > 1:
        raise TokenSparseError(
            f"models expect different input sizes {sizes}; pass input_size explicitly")
    return next(iter(sizes.values()))


def compare_throughput(models: Mapping[str, nn.Module], batch_size: int = 32,
                       input_size: Sequence[int] | None = None, threads: int | None = None,
                       device: str | torch.device = "cpu", dtype: str = "fp32",
                       warmup: int = 2, runs: int = 10,
                       progress: ProgressFn | None = None) -> dict[str, float]:
    """Images per second of each model: median of ``runs`` timed passes after ``warmup``.

    Models are timed round-robin (one pass of each model per run, the starting model
    rotating between runs) on the same random batch, under ``torch.inference_mode()``.
    Models are moved to ``device`` in place and left there; their train/eval mode is
    restored. ``dtype='bf16'`` runs under ``torch.autocast``. :func:`timed_runs` gives the
    seconds of every pass (for the spread: :func:`speedup_range`).
    """
    times = timed_runs(models, batch_size=batch_size, input_size=input_size, threads=threads, device=device,
                       dtype=dtype, warmup=warmup, runs=runs, progress=progress)
    return throughput(times, batch_size)


def throughput(times: Mapping[str, Sequence[float]], batch_size: int) -> dict[str, float]:
    """Images per second of each model from :func:`timed_runs`' seconds: ``batch_size`` / median."""
    return {n: batch_size / statistics.median(t) for n, t in times.items()}


def speedup_range(times: Mapping[str, Sequence[float]], baseline: str, name: str) -> tuple[float, float]:
    """Lowest and highest speed-up of ``name`` over ``baseline`` in one round of :func:`timed_runs`
    (baseline seconds / model seconds, both timed in the same round).

    The speed-up of the medians (:func:`compare_throughput`) always lies in this range.
    """
    ratios = [b / t for b, t in zip(times[baseline], times[name])]
    return min(ratios), max(ratios)


def timed_runs(models: Mapping[str, nn.Module], batch_size: int = 32,
               input_size: Sequence[int] | None = None, threads: int | None = None,
               device: str | torch.device = "cpu", dtype: str = "fp32",
               warmup: int = 2, runs: int = 10,
               progress: ProgressFn | None = None) -> dict[str, list[float]]:
    """Seconds of each of the ``runs`` timed forward passes of every model, in round order.

    Round ``k`` times every model once (see :func:`compare_throughput`, which takes the same
    arguments), so entry ``k`` of two models' lists were timed side by side.
    """
    if not models:
        raise TokenSparseError("compare_throughput needs at least one model")
    positive_int(batch_size, "batch_size")
    positive_int(runs, "runs")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise TokenSparseError(f"warmup must be a non-negative integer, got {warmup!r}")
    dev, amp_dtype = measurement_device(device), resolve_dtype(dtype)
    size = tuple(input_size) if input_size is not None else _common_input_size(models)
    names = list(models)
    for m in models.values():
        m.to(dev)
    x = torch.randn(batch_size, *size, generator=torch.Generator().manual_seed(0)).to(dev)
    times: dict[str, list[float]] = {n: [] for n in names}
    total, done = (warmup + runs) * len(names), 0
    with num_threads(threads), eval_mode(*models.values()), torch.inference_mode():
        for run in range(warmup + runs):
            shift = run % len(names)
            for name in names[shift:] + names[:shift]:
                seconds = _timed_forward(models[name], x, dev, amp_dtype)
                if run >= warmup:
                    times[name].append(seconds)
                done += 1
                if progress is not None:
                    progress(done, total)
    return times

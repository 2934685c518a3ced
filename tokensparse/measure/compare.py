"""Every number of a set of model variants in one run: GMACs, interleaved throughput, accuracy.

The one measuring loop behind ``tokensparse bench`` and ``tokensparse sweep``.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import patch
from ..errors import TokenSparseError
from ..utils import progress_bar
from .accuracy import evaluate_many
from .flops import gmacs
from .speed import compare_throughput

BASELINE = "none"
"""The name of the unreduced model among the variants (``--method none``)."""

METRICS = ("gmacs", "img_per_s", "speedup", "top1", "top5", "agreement")
"""The keys of every entry :func:`measure_variants` returns."""


def build_variants(base: nn.Module, specs: Sequence[str]) -> dict[str, nn.Module]:
    """``{"none": base, spec: patched deep copy of base, ...}``: identical weights, ``base`` untouched."""
    variants = {BASELINE: base}
    for spec in specs:
        if spec != BASELINE:
            variants[spec] = patch(copy.deepcopy(base), spec)
    return variants


def measure_variants(models: Mapping[str, nn.Module], baseline_key: str,
                     images: str | Path | None = None, wnids: str | Path | None = None, *,
                     limit: int | None = None, batch_size: int = 32, threads: int | None = None,
                     device: str | torch.device = "cpu", dtype: str = "fp32", runs: int = 10,
                     warmup: int = 2, progress: bool = True) -> dict[str, dict[str, float | None]]:
    """Measure every model against ``models[baseline_key]`` (typically the unreduced model).

    Returns ``{name: {"gmacs", "img_per_s", "speedup", "top1", "top5", "agreement"}}`` in the
    order of ``models``: GMACs per image from a real forward pass (:func:`gmacs`), images per
    second timed interleaved in one process (:func:`compare_throughput`, median of ``runs``
    after ``warmup``; ``speedup`` relative to the baseline), and with ``images`` top-1, top-5
    and agreement with the baseline in one pass over the folder (:func:`evaluate_many`, first
    ``limit`` images); without ``images`` the accuracy values are None. Models are moved to
    ``device``; their train/eval mode is restored.
    """
    if baseline_key not in models:
        raise TokenSparseError(f"baseline {baseline_key!r} is not one of the models: {', '.join(models)}")
    out: dict[str, dict[str, float | None]] = {name: dict.fromkeys(METRICS) for name in models}
    with progress_bar("GMACs", len(models), progress) as advance:
        for name, model in models.items():
            out[name]["gmacs"] = gmacs(model)
            advance()
    with progress_bar("throughput", (warmup + runs) * len(models), progress) as advance:
        speed = compare_throughput(models, batch_size=batch_size, threads=threads, device=device,
                                   dtype=dtype, warmup=warmup, runs=runs,
                                   progress=lambda done, total: advance())
    for name, ips in speed.items():
        out[name].update(img_per_s=ips, speedup=ips / speed[baseline_key])
    if images is not None:
        accuracy: dict[str, Any] = evaluate_many(
            models, images, wnids, reference_key=baseline_key, batch_size=batch_size,
            device=device, limit=limit, progress=progress)
        for name, res in accuracy.items():
            out[name].update(top1=res["top1"], top5=res["top5"], agreement=res["agreement"])
    return out

"""Every number of a set of model variants in one run: GMACs, interleaved throughput, accuracy.

The one measuring loop behind ``tokensparse bench`` and ``tokensparse sweep``.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import patch
from ..data import ImageNetFolder, UnlabelledImages, dataset_files, input_size, scan_images, split_dataset
from ..errors import TokenSparseError
from ..methods import get_method
from ..spec import parse_spec
from ..utils import progress_bar
from ._common import check_finite_parameters, measurement_device
from .accuracy import evaluate_many
from .embedding import embed_many, embedding_fidelity, is_classifier
from .flops import gmacs
from .runtimes import prepare_runtime
from .speed import num_threads, speedup_range, throughput, timed_runs

BASELINE = "none"
"""The name of the unreduced model among the variants (``--method none``)."""

METRICS = ("gmacs", "img_per_s", "latency_ms", "speedup", "top1", "top5", "agreement", "cosine", "speedup_low",
           "speedup_high", "compile_s", "eager_speedup", "eager_latency_ms")
"""The keys of every entry :func:`measure_variants` returns."""

WIDE_SPREAD = 0.10
"""A speed-up whose range across rounds is wider than this share of it is flagged (:func:`wide_spread`)."""


def eager_key(name: str) -> str:
    """The name the eager model ``name`` is timed under next to its compiled or exported form."""
    return f"{name} [eager]"


def random_predictors(spec: str) -> bool:
    """True when ``spec`` names a method whose learned parts must be trained (DynamicViT)
    without trained ones (no ``predictors=FILE``): they are random, so its accuracy means
    nothing (its speed is still that of the trained method)."""
    name, options = parse_spec(spec)
    if name == BASELINE:
        return False
    return get_method(name).needs_training and options.get("predictors") is None


def wide_spread(metrics: Mapping[str, float | None], limit: float = WIDE_SPREAD) -> bool:
    """Whether a :func:`measure_variants` entry's speed-up range is wider than ``limit`` x its speed-up."""
    low, high, mid = metrics.get("speedup_low"), metrics.get("speedup_high"), metrics.get("speedup")
    return None not in (low, high, mid) and (high - low) > limit * mid


def build_variants(base: nn.Module, specs: Sequence[str]) -> dict[str, nn.Module]:
    """``{"none": base, spec: patched deep copy of base, ...}``: identical weights, ``base`` untouched."""
    variants = {BASELINE: base}
    for spec in specs:
        if spec != BASELINE:
            variants[spec] = patch(copy.deepcopy(base), spec)
    return variants


def measured() -> Any:
    """A number field of a measured row: keyword-only, None until it is measured."""
    return field(default=None, kw_only=True)


@dataclass
class MeasuredRow:
    """A reduction (``method``, ``spec``) and what was measured of it, None where it was not: GMACs
    per image, speed-up over the unreduced model, agreement with it (%) and top-1 (%). The rows
    ``sweep`` and ``tune`` write as CSV extend it; its numbers are :func:`measured` fields."""
    method: str
    spec: str
    gmacs: float | None = measured()
    speedup: float | None = measured()
    agreement: float | None = measured()
    top1: float | None = measured()


def measure_variants(models: Mapping[str, nn.Module], baseline_key: str,
                     images: str | Path | None = None, wnids: str | Path | None = None, *,
                     limit: int | None = None, batch_size: int = 32, threads: int | None = None,
                     device: str | torch.device = "cpu", dtype: str = "fp32", runs: int = 10,
                     warmup: int = 2, progress: bool = True, runtime: str = "eager",
                     compile_backend: str = "inductor") -> dict[str, dict[str, float | None]]:
    """Measure every model against ``models[baseline_key]`` (typically the unreduced model).

    Returns ``{name: {"gmacs", "img_per_s", "latency_ms", "speedup", "top1", "top5", "agreement",
    "speedup_low", "speedup_high"}}`` in the order of ``models``: GMACs per image from a real
    forward pass (:func:`gmacs`), images per second timed interleaved in one process
    (:func:`compare_throughput`, median of ``runs`` after ``warmup``; ``latency_ms`` the median
    milliseconds of one batch, so ``batch_size=1`` gives the latency; ``speedup`` relative to
    the baseline, ``speedup_low`` / ``speedup_high`` the lowest and highest speed-up in one
    round, :func:`speedup_range`), and with ``images`` top-1, top-5 and agreement with the
    baseline in one pass over the folder (:func:`evaluate_many`, first ``limit`` images); for
    a feature extractor (no classifier: :func:`~tokensparse.measure.embedding.is_classifier`)
    ``agreement`` is the neighbour agreement and ``cosine`` the mean cosine similarity of the
    embeddings to the baseline's, from any images under ``images`` (no labels:
    :func:`~tokensparse.measure.embedding.embedding_fidelity`); without ``images`` these are None. Models are moved to ``device``; their
    train/eval mode is restored.

    ``runtime`` (:data:`~tokensparse.measure.runtimes.RUNTIMES`): what is timed: the models
    (``eager``), ``torch.compile(fullgraph=True)`` of them (``compile``, with
    ``compile_backend``), or their ONNX export in onnxruntime (``onnxruntime``); ``compile_s``
    is the one-off seconds of compiling (or exporting and checking) each, never part of the
    throughput (None for ``eager``). GMACs and accuracy are always those of the PyTorch models
    (an export matches them within 1e-4). With a runtime other than ``eager`` the eager models
    are timed in the same rounds too, so ``eager_speedup`` and ``eager_latency_ms`` (None for
    ``eager``) compare the runtime with eager PyTorch in one run.

    Before anything is timed, every model's parameters are checked for NaN / inf and every
    image (of the first ``limit``) is decoded once, so a corrupt model or image is a clear
    error at once; logits with NaN / inf are an error too, never an accuracy.
    """
    if baseline_key not in models:
        raise TokenSparseError(f"baseline {baseline_key!r} is not one of the models: {', '.join(models)}")
    dev = measurement_device(device)
    check_finite_parameters(models, {baseline_key: f"the unreduced model ({baseline_key!r})"})
    features = not is_classifier(models[baseline_key])
    if images is not None:
        folder = UnlabelledImages(images) if features else ImageNetFolder(images, wnids)
        files = dataset_files(split_dataset(folder, limit=limit))
        with progress_bar("checking images", len(files), progress) as advance:
            scan_images(files, progress=advance)
    out: dict[str, dict[str, float | None]] = {name: dict.fromkeys(METRICS) for name in models}
    with progress_bar("GMACs", len(models), progress) as advance:
        for name, model in models.items():
            out[name]["gmacs"] = gmacs(model)
            advance()
    size = input_size(next(iter(models.values())))
    with progress_bar(runtime, len(models), progress and runtime != "eager") as advance, num_threads(threads):
        timing, setup = prepare_runtime(models, runtime, batch_size, size, threads, dev, dtype, compile_backend,
                                        progress=advance)
    for name, seconds in setup.items():
        out[name]["compile_s"] = seconds
    eager = {} if runtime == "eager" else {eager_key(name): model for name, model in models.items()}
    timed = {key: model for name in models  # each runtime model next to its eager self: timed side by side
             for key, model in ((name, timing[name]), (eager_key(name), eager.get(eager_key(name)))) if model is not None}
    with progress_bar("throughput", (warmup + runs) * len(timed), progress) as advance:
        times = timed_runs(timed, batch_size=batch_size, input_size=size, threads=threads,
                           device=device, dtype=dtype, warmup=warmup, runs=runs,
                           progress=lambda done, total: advance())
    speed = throughput(times, batch_size)
    for name in models:
        ips = speed[name]
        low, high = speedup_range(times, baseline_key, name)
        out[name].update(img_per_s=ips, latency_ms=1000.0 * batch_size / ips, speedup=ips / speed[baseline_key],
                         speedup_low=low, speedup_high=high)
        if eager:
            eager_ips = speed[eager_key(name)]
            out[name].update(eager_speedup=eager_ips / speed[eager_key(baseline_key)],
                             eager_latency_ms=1000.0 * batch_size / eager_ips)
    if images is not None and features:
        embeddings = embed_many(models, images, batch_size=batch_size, device=device, limit=limit, progress=progress)
        for name, emb in embeddings.items():
            agreement, cosine = embedding_fidelity(emb, embeddings[baseline_key])
            out[name].update(agreement=agreement, cosine=cosine)
    elif images is not None:
        accuracy: dict[str, Any] = evaluate_many(
            models, images, wnids, reference_key=baseline_key, batch_size=batch_size,
            device=device, limit=limit, progress=progress)
        for name, res in accuracy.items():
            out[name].update(top1=res["top1"], top5=res["top5"], agreement=res["agreement"])
    return out

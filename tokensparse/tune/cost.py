"""The cost model: one block timed at a grid of token counts, fitted and scaled to the measured model; a
schedule's token counts from a probe pass."""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..families import TokenFamily
from ..measure import (
    gmacs,
)
from ..measure._common import synchronize


@dataclass
class Schedule:
    """Token counts one image's attention and MLP see in each block, and the GMACs, from a probe pass."""
    attention: list[int]
    mlp: list[int]
    gmacs: float

    @property
    def reductions(self) -> int:
        """Blocks that reduce tokens (between attention and MLP, or before the block)."""
        inner = sum(m < a for a, m in zip(self.attention, self.mlp))
        before = sum(a < m for a, m in zip(self.attention[1:], self.mlp[:-1]))
        return inner + before


def probe(model: nn.Module, family: TokenFamily, size: Sequence[int], count: bool = True) -> Schedule:
    """One image through ``model`` (as patched now), counting each block's attention and MLP tokens,
    and its GMACs when ``count`` (NaN otherwise: a plain pass is about 10x cheaper)."""
    counts: dict[tuple[int, int], int] = {}
    handles = []
    for i in range(len(family.blocks)):
        for j, module in enumerate(family.token_probes(i)):
            def hook(_m: nn.Module, args: tuple, i: int = i, j: int = j) -> None:
                # the first call: a block that merges inside its attention (MCTF) normalises its
                # input, then the merged tokens for their values
                counts.setdefault((i, j), int(args[0].shape[1]))
            handles.append(module.register_forward_pre_hook(hook))
    try:
        if count:
            g = gmacs(model, size)
        else:
            device, dtype = next(((p.device, p.dtype) for p in model.parameters()), (None, None))
            with torch.inference_mode():
                model(torch.zeros(1, *size, device=device, dtype=dtype))
            g = math.nan
    finally:
        for h in handles:
            h.remove()
    depth = len(family.blocks)
    return Schedule([counts[i, 0] for i in range(depth)], [counts[i, 1] for i in range(depth)], g)


class CostModel:
    """Predicted seconds of a batch from a schedule.

    One block is timed on its own at a grid of token counts (:func:`time_blocks`), fitted with a
    quadratic in the token count and scaled so that the unreduced model's blocks plus its
    embedding (``fixed``, timed too) add up to the unreduced model's measured time ``total``;
    a schedule's time is the sum over its blocks' token counts. ``overhead[method]``: seconds a method's own work
    (scoring, matching, gathering) adds per reducing block, from timing its hand-set default
    for real.
    """

    ATTENTION_SHARE = 1 / 3
    """Share of a block's time spent before its MLP (the attention sublayer: a third of a ViT
    block's multiply-adds at 4x MLP width); a reduction between them splits the block's cost."""

    def __init__(self, grid: list[int], seconds: list[float], total: float, fixed: float, depth: int) -> None:
        self.depth, self.total = depth, total
        self.fixed = min(fixed, 0.5 * total)
        # a block's time is a + b n + c n^2 (projections and MLP linear in n, attention quadratic):
        # a least-squares fit smooths the timing noise of single grid points
        n = torch.tensor(grid, dtype=torch.float64)
        design = torch.stack([torch.ones_like(n), n, n * n], dim=1)
        coef = torch.linalg.lstsq(design, torch.tensor(seconds, dtype=torch.float64).unsqueeze(1)).solution
        self.coef = [float(c) for c in coef.squeeze(1)]
        self.scale = 1.0
        if self.block(grid[-1]) <= 0:  # timings too noisy to fit (a busy machine, a tiny model): proportional
            self.coef = [0.0, max(max(seconds), 1e-12) / max(grid), 0.0]
        self.scale = (total - self.fixed) / (depth * self.block(grid[-1]))
        self.overhead: dict[str, float] = {}

    def block(self, n: float) -> float:
        """Seconds of one block on ``n`` tokens (the fit, scaled to the whole model)."""
        a, b, c = self.coef
        return self.scale * max(0.0, a + b * n + c * n * n)

    def raw(self, schedule: Schedule) -> float:
        """Seconds of the blocks at ``schedule``'s token counts, plus the fixed part."""
        a = self.ATTENTION_SHARE
        return self.fixed + sum(a * self.block(na) + (1 - a) * self.block(nm)
                                for na, nm in zip(schedule.attention, schedule.mlp))

    def seconds_of(self, schedule: Schedule, method: str) -> float:
        return self.raw(schedule) + self.overhead.get(method, 0.0) * schedule.reductions

    def speedup(self, schedule: Schedule, method: str) -> float:
        return self.total / self.seconds_of(schedule, method)


def time_blocks(family: TokenFamily, batch: int, grid: list[int], device: torch.device, dtype: torch.dtype,
                reps: int = 7) -> list[float]:
    """Median seconds of block 0 (unpatched) on ``(batch, n, C)`` tokens for each ``n`` of ``grid``."""
    width = family.width()
    out = []
    with torch.inference_mode(), autocast_for(device, dtype):
        for n in grid:
            x = torch.randn(batch, n, width, device=device)
            family.run_blocks(x, 0, 1)
            times = []
            for _ in range(reps):
                synchronize(device)
                start = time.perf_counter()
                family.run_blocks(x, 0, 1)
                synchronize(device)
                times.append(time.perf_counter() - start)
            out.append(statistics.median(times))
    return out


def autocast_for(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Token counts the cost model times a block at, as shares of the patch tokens."""


def time_embedding(family: TokenFamily, images: Tensor, device: torch.device, dtype: torch.dtype) -> float:
    """Median seconds of the model's embedding (everything before block 0) on one batch."""
    images = images.to(device)
    times = []
    with torch.inference_mode(), autocast_for(device, dtype):
        for _ in range(4):
            synchronize(device)
            start = time.perf_counter()
            family.run_to(images, 0)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])

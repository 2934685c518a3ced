"""``tokensparse tune``: the most faithful reduction for a speed (or GMACs) target, measured here.

Every method here reduces a fixed number of tokens at each location, so a *schedule* (how
many tokens each location removes) is a spec string (``tome:r=[...]``,
``topk:locations=[...],tokens=[...]``, ``evit:...``, ``ppt:locations=[...],r=[...]``,
``evovit:keep_rate=[...]``), and so is a schedule of several methods (``mix``:
``ppt:...+tome:r=[...]+topk:...``, searched when named). :func:`tune` searches per-location
schedules of every training-free method for the one closest to the unreduced model at a given
speed-up:

1. *Images*: any folder (labels are not needed). The even positions are searched on (their
   first half *screens* schedules, their second half *selects* among the finalists, so the
   choice is not made on the images the screening fitted); the odd positions are held out,
   and every fidelity number reported comes from them. The unreduced model's logits are
   computed once.
2. *Fidelity*: agreement (same top-1) and mean KL(unreduced || reduced) of the logits. KL
   moves smoothly with the schedule, where top-1 on a few hundred images moves in steps of
   a whole image.
3. *Cost*, measured on this machine (the user's batch size, threads, device and dtype): one
   block timed at a grid of token counts, fitted and scaled to the unreduced model's measured
   time, summed over the token counts each block of a schedule computes on (from a one-image
   probe pass: the inputs of its attention and its MLP); plus each method's own work per
   reducing block, from timing its hand-set default for real. With a GMACs target the cost is
   the GMACs counted in the probe pass.
4. *Search*: a schedule is a *shape* (locations and relative weights: from one of the first
   blocks on, every block or every third, flat, falling or rising) scaled by bisection to the
   target (a little past it: timing varies), so every candidate is compared at the same
   speed. Each method's shapes are screened, the best shape also with every patch token its
   method can remove cut after the last block's attention (free for a class-token head: only
   the class token goes on), then the two best methods' best shapes are refined one location
   at a time (a step counts only when both halves of the screening images agree). A
   candidate's pass resumes at its first reducing block from the unreduced tokens kept there
   (Evo-ViT, whose global attention starts at block 0, runs whole).
5. *Finalists*: the best schedules, two points of the best shape on the way to the target
   (the front) and the hand-set defaults are timed for real against the unreduced model,
   interleaved in one run (a close call to the target: three times, the median counts), and
   evaluated on the selection and held-out images. Among the rows whose measured speed-up
   meets the target, the choice is the hand-set default with the highest mean log-probability
   of the unreduced model's top-1 class on the selection images (a statistic that tracks
   changed predictions; KL breaks ties), unless a searched schedule beats it there by more than
   two standard errors of the per-image differences: then the best such schedule.

The time budget covers the whole run: the search stops early to leave time for the
finalists, and a budget too small to reach the target still returns the best schedule
measured (flagged ``met_target=False``).
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from .api import is_patched, patch, token_state, unpatch
from .data import UNLABELLED, image_dataset, input_size
from .errors import TokenSparseError
from .families import TokenFamily, get_family
from .measure import (
    BASELINE,
    build_variants,
    cosine_to,
    embedding_fidelity,
    embedding_of,
    fidelity,
    gmacs,
    is_classifier,
    kept_logprob,
    timed_runs,
)
from .measure._common import measurement_device, resolve_dtype, synchronize
from .measure.speed import num_threads
from .methods import REGISTRY, get_method
from .methods.base import default_locations
from .methods.evovit import default_stages
from .methods.mctf import MIN_TOKENS as MCTF_MIN_TOKENS
from .spec import format_spec, parse_spec
from .utils import eval_mode, output_logits, positive_int, progress_bar, write_rows_csv
from .viz import save_figure

__all__ = ["TUNABLE", "Candidate", "TuneResult", "check_target", "plot_tune", "tune", "write_tune_csv"]


# ----------------------------------------------------------------------------- schedules

class Knob:
    """A method's per-location schedule: ``values[loc]`` tokens removed at location ``loc``.

    Schedules are searched as *shapes*: a set of locations with relative weights, scaled by one
    amount to hit the target (:meth:`fill`). ``cut`` is the last block, where a method may
    remove every patch token it can after the last attention (free for a class-token head:
    the last MLP then runs on the class token alone), or None.
    """
    method: str = ""
    resumable: bool = True
    """Whether a pass can resume at its first reducing block from the unreduced pass's tokens
    (reductions inside blocks; not Evo-ViT, whose global attention starts at block 0)."""
    first: int = 1
    """The first block a shape may start at (class-attention methods skip block 0)."""
    parts: tuple[str, ...] = ()
    """The methods a schedule of several methods runs (their own overheads are its cost); empty: ``method``."""
    by_default: bool = True
    """Whether :func:`tune` searches it when no methods are named."""

    @classmethod
    def methods(cls) -> tuple[str, ...]:
        return cls.parts or (cls.method,)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether every method the knob's schedules run supports ``model``."""
        return all(get_method(name)().supports(model) for name in cls.methods())

    def __init__(self, depth: int, patches: int, num_prefix: int) -> None:
        self.depth, self.patches, self.num_prefix = depth, patches, num_prefix

    @property
    def cut(self) -> int | None:
        return self.depth - 1 if self.depth > 2 else None

    def positions(self) -> list[int]:
        """Where shapes place reductions (the cut block apart)."""
        return list(range(self.first, self.depth - 1))

    def shapes(self) -> list[tuple[str, dict[int, float]]]:
        """``(label, {location: weight})`` schedules to try: reductions from one of the first five
        blocks on, in every block or every third, flat, falling (more tokens early, where they
        save most) or rising (more late, where they lose least)."""
        out = []
        pos = self.positions()
        for start in pos[:5]:
            for step in self.steps:
                locs = [b for b in pos if b >= start and (b - start) % step == 0]
                for profile in self.profiles:
                    out.append((f"from {start} every {step} {profile}", _profile(locs, profile)))
        return out

    steps: tuple[int, ...] = (1, 3)
    profiles: tuple[str, ...] = ("flat", "falling", "rising")

    def spec(self, values: dict[int, int]) -> str:
        raise NotImplementedError

    def limit(self, values: dict[int, int], loc: int) -> int:
        """The most tokens location ``loc`` may remove given the earlier locations' values."""
        raise NotImplementedError

    def _before(self, values: dict[int, int], loc: int) -> int:
        """Patch tokens entering location ``loc`` after the earlier locations' values."""
        return self.patches - sum(v for b, v in values.items() if b < loc)

    def fill(self, weights: dict[int, float], amount: float, cut: bool) -> dict[int, int]:
        """``round(amount * weight)`` tokens at each location (within the limits, in block order), and
        as many as allowed at the cut block when ``cut``."""
        values: dict[int, int] = {}
        for loc in sorted(weights):
            v = min(round(amount * weights[loc]), self.limit(values, loc))
            if v > 0:
                values[loc] = v
        if cut and self.cut is not None:
            v = self.limit(values, self.cut)
            if v > 0:
                values[self.cut] = v
        return values

    def first_block(self, values: dict[int, int]) -> int:
        """The block a pass of ``values`` can resume at (its first reduction)."""
        return min((b for b, v in values.items() if v > 0), default=0) if self.resumable else 0


def _profile(locs: list[int], profile: str) -> dict[int, float]:
    """Weights over ``locs``: ``flat`` (all 1), ``falling`` (1.5 to 0.5) or ``rising`` (0.5 to 1.5)."""
    n = len(locs)
    if profile == "flat" or n == 1:
        return dict.fromkeys(locs, 1.0)
    ramp = [1.5 - i / (n - 1) for i in range(n)]
    return dict(zip(locs, ramp if profile == "falling" else ramp[::-1]))


class ToMeKnob(Knob):
    """ToMe: ``values[block]`` tokens merged in that block (``r`` per block)."""
    method = "tome"
    first = 0
    steps = (1,)

    def spec(self, values: dict[int, int]) -> str:
        r = [values.get(b, 0) for b in range(self.depth)]
        while len(r) > 1 and r[-1] == 0:
            r.pop()
        return format_spec(self.method, {"r": r})

    def limit(self, values: dict[int, int], loc: int) -> int:
        return self._before(values, loc) // 2  # ToMe merges at most half of the patch tokens per block


class MCTFKnob(ToMeKnob):
    """MCTF: as ToMe, from block 1 (the authors' setting), leaving at least ten tokens (theirs). No
    cut: at its default MCTF merges after the block, which saves nothing in the last one."""
    method = "mctf"
    first = 1

    @property
    def cut(self) -> int | None:
        return None

    def limit(self, values: dict[int, int], loc: int) -> int:
        before = self._before(values, loc)
        return max(0, min(before // 2, before + self.num_prefix - MCTF_MIN_TOKENS))


class ToFuKnob(ToMeKnob):
    """ToFu: as ToMe (``r`` per block: pruned before its switch block, merged by MLERP after)."""
    method = "tofu"


class PiToMeKnob(ToMeKnob):
    """PiToMe: ``r`` per block, as ToMe (replacing the authors' one keep ratio for every block)."""
    method = "pitome"


class ZeroTPruneKnob(ToMeKnob):
    """Zero-TPrune: ``r`` patch tokens pruned per block, at most the less important half."""
    method = "zerotprune"


class DiffRateKnob(Knob):
    """DiffRate: ``values[block]`` patch tokens removed in that block, half pruned (by class attention),
    half merged (rounding to pruning), as the per-block kept counts DiffRate takes."""
    method = "diffrate"
    first = 0

    def spec(self, values: dict[int, int]) -> str:
        last = max((b for b, v in values.items() if v > 0), default=0)
        prune, merge = [], []
        for b in range(last + 1):
            before = self._before(values, b)
            v = values.get(b, 0)
            prune.append(before - (v - v // 2))
            merge.append(before - v)
        return format_spec(self.method, {"prune_kept": prune, "merge_kept": merge})

    def limit(self, values: dict[int, int], loc: int) -> int:
        return max(0, self._before(values, loc) - 1)


class TopKKnob(Knob):
    """Top-K / EViT: ``values[loc]`` patch tokens dropped at ``loc`` (EViT keeps one fused token more)."""
    method = "topk"
    fuse = False

    def _before(self, values: dict[int, int], loc: int) -> int:
        """As :meth:`Knob._before`, plus the token each earlier reducing location fuses (EViT)."""
        fused = sum(1 for b, v in values.items() if b < loc and v > 0) if self.fuse else 0
        return super()._before(values, loc) + fused

    def spec(self, values: dict[int, int]) -> str:
        locs = sorted(b for b, v in values.items() if v > 0)
        if not locs:
            return format_spec(self.method, {"tokens": self.patches, "locations": [self.depth - 1]})
        kept = [self._before(values, b) - values[b] for b in locs]
        return format_spec(self.method, {"locations": locs, "tokens": kept})

    def limit(self, values: dict[int, int], loc: int) -> int:
        return max(0, self._before(values, loc) - 1)


class EViTKnob(TopKKnob):
    method = "evit"
    fuse = True


class PPTKnob(Knob):
    method = "ppt"

    def spec(self, values: dict[int, int]) -> str:
        locs = sorted(b for b, v in values.items() if v > 0)
        if not locs:
            return format_spec("ppt", {"r": 0, "locations": [self.depth - 1]})
        return format_spec("ppt", {"locations": locs, "r": [values[b] for b in locs]})

    def limit(self, values: dict[int, int], loc: int) -> int:
        return self._before(values, loc) // 2  # both branches remove at most half of the patch tokens


class EvoViTKnob(Knob):
    """Evo-ViT: ``values[stage start]`` patch tokens sent down the fast path in that stage."""
    method = "evovit"
    resumable = False

    @property
    def cut(self) -> int | None:
        return None

    def positions(self) -> list[int]:
        return default_stages(self.depth)

    def shapes(self) -> list[tuple[str, dict[int, float]]]:
        return [(f"stages {profile}", _profile(self.positions(), profile)) for profile in self.profiles]

    def spec(self, values: dict[int, int]) -> str:
        rates = [_rate_for(self.patches - values.get(s, 0), self.patches) for s in self.positions()]
        return format_spec("evovit", {"keep_rate": rates})

    def limit(self, values: dict[int, int], loc: int) -> int:
        return self.patches - 1


class MixKnob(Knob):
    """PPT at its default blocks (1/4, 1/2, 3/4 of the depth), ToMe at every other block, and at
    the cut Top-K keeping one patch token: one schedule over all blocks, written as a mix spec
    (``ppt:...+tome:r=[...]+topk:...``). A location's method is fixed by its block, so the search
    and refinement move token counts exactly as for a single method."""
    method = "mix"
    parts = ("ppt", "tome", "topk")
    by_default = False  # measured (mix_fidelity.txt): on ViT-Tiny its extra reducing blocks cost more than its KL gains
    steps = (1,)

    def __init__(self, depth: int, patches: int, num_prefix: int) -> None:
        super().__init__(depth, patches, num_prefix)
        self.ppt_blocks = set(default_locations(depth)) - {self.cut}

    def shapes(self) -> list[tuple[str, dict[int, float]]]:
        """From one of the first four blocks on, every block: PPT's blocks weighted 2, 4 or 8
        times ToMe's (flat, or ToMe falling)."""
        out = []
        pos = self.positions()
        for start in pos[:4]:
            locs = [b for b in pos if b >= start]
            tome = [b for b in locs if b not in self.ppt_blocks]
            for ratio in (2, 4, 8):
                for profile in ("flat", "falling"):
                    weights = {b: float(ratio) for b in locs if b in self.ppt_blocks}
                    weights.update(_profile(tome, profile) if tome else {})
                    out.append((f"from {start}, ppt {ratio}x tome {profile}", weights))
        return out

    def spec(self, values: dict[int, int]) -> str:
        parts = []
        ppt = sorted(b for b, v in values.items() if v > 0 and b in self.ppt_blocks)
        if ppt:
            parts.append(format_spec("ppt", {"locations": ppt, "r": [values[b] for b in ppt]}))
        r = [values.get(b, 0) if b not in self.ppt_blocks and b != self.cut else 0 for b in range(self.depth)]
        while r and r[-1] == 0:
            r.pop()
        if r:
            parts.append(format_spec("tome", {"r": r}))
        if self.cut is not None and values.get(self.cut, 0) > 0:
            kept = self._before(values, self.cut) - values[self.cut]
            parts.append(format_spec("topk", {"locations": [self.cut], "tokens": [kept]}))
        if not parts:
            return format_spec("ppt", {"r": 0, "locations": [self.depth - 1]})
        return "+".join(parts)

    def limit(self, values: dict[int, int], loc: int) -> int:
        n = self._before(values, loc)
        return max(0, n - 1) if loc == self.cut else n // 2  # ppt and tome: at most half per block


def _rate_for(kept: int, n: int) -> float:
    """The shortest keep rate (4 decimals) with ``floor(n * rate) == kept`` (Evo-ViT's rounding)."""
    return min(1.0, math.ceil(kept / n * 1e4) / 1e4)


TUNABLE: dict[str, type[Knob]] = {k.method: k for k in (ToMeKnob, MCTFKnob, ToFuKnob, PiToMeKnob, ZeroTPruneKnob,
                                                         DiffRateKnob, TopKKnob, EViTKnob, PPTKnob, EvoViTKnob, MixKnob)}
"""Methods :func:`tune` searches, with their schedules."""


# ----------------------------------------------------------------------------- results

@dataclass
class Candidate:
    """One schedule: its spec and what was measured of it.

    ``predicted_speedup`` from the cost model (searched rows); ``speedup`` measured in the
    final interleaved timing; ``search_*`` on the screening images (searched rows),
    ``select_*`` on the selection images (``select_logp``, the mean log-probability of the
    unreduced model's top-1 class, is what the choice is made on), ``agreement`` / ``kl`` /
    ``top1`` on the held-out images (what is reported). ``role``: ``unreduced``,
    ``default`` (a method's hand-set default), ``path`` (the best shape on the way to the
    target: the front), ``finalist`` (a searched schedule at the target) or ``chosen``.
    ``pareto``: no other row is both faster (or fewer GMACs) and lower in held-out KL.
    ``timings``: how many interleaved timings ``speedup`` is the median of (a close call to a
    speed-up target is timed :data:`CLOSE_TIMINGS` times).
    """
    spec: str
    method: str
    role: str = "path"
    gmacs: float | None = None
    predicted_speedup: float | None = None
    speedup: float | None = None
    search_agreement: float | None = None
    search_kl: float | None = None
    select_agreement: float | None = None
    select_kl: float | None = None
    select_logp: float | None = None
    agreement: float | None = None
    kl: float | None = None
    top1: float | None = None
    pareto: bool = False
    timings: int = 1


@dataclass
class TuneResult:
    """What :func:`tune` found: the measured candidates (``rows``: unreduced, defaults, finalists
    and front points, by measured speed-up), the Pareto ``front`` of them (measured speed-up
    against held-out KL), the ``choice``, the ``target`` speed-up (or GMACs) and whether the
    choice meets it, and the seconds the run took."""
    rows: list[Candidate]
    front: list[Candidate]
    choice: Candidate
    target: float
    target_kind: str
    met_target: bool
    seconds: float
    search_seconds: float
    notes: list[str] = field(default_factory=list)
    features: bool = False
    """A feature extractor: ``agreement`` is neighbour agreement and ``kl`` is ``1 -`` the mean cosine
    similarity of the embeddings (:func:`embedding_scores`)."""


# ----------------------------------------------------------------------------- fidelity

class Evaluator:
    """Logits of a model, as patched now, on fixed image batches.

    The tokens entering every block of the *unreduced* model are kept (``resume``), so a
    schedule whose first reduction is at block ``b`` runs only blocks ``b`` onwards: until its
    first reduction it computes exactly what the unreduced model does.
    """

    def __init__(self, model: nn.Module, family: TokenFamily, batches: list[Tensor], device: torch.device,
                 dtype: torch.dtype, resume: bool = False, features: bool = False) -> None:
        self.model, self.family, self.device, self.dtype = model, family, device, dtype
        self.depth = len(family.blocks)
        self.size = sum(len(b) for b in batches)
        self.features = features
        self.inputs: list[list[Tensor]] = []  # [batch][block]: tokens entering the block, unreduced
        if features:  # a feature extractor: its own output, the whole model run on the images
            self.inputs = [[images.to(device)] for images in batches]
            return
        with torch.inference_mode(), self._autocast():
            for images in batches:
                x = family.run_to(images.to(device), 0)
                entering = [x]
                if resume:
                    for i in range(self.depth - 1):
                        x = family.run_blocks(x, i, i + 1)
                        entering.append(x)
                self.inputs.append(entering)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def logits(self, start: int = 0) -> Tensor:
        """Logits of the model as patched now, from block ``start`` on (``start`` > 0: the model
        reduces nothing before it, and the evaluator keeps every block's input); a feature
        extractor's embeddings (:func:`~tokensparse.measure.embedding_of`) from the whole model."""
        if self.features:
            with torch.inference_mode(), self._autocast():
                return torch.cat([embedding_of(self.model(images[0])).float() for images in self.inputs])
        state = token_state(self.model) if is_patched(self.model) else None
        out = []
        with torch.inference_mode(), self._autocast():
            for entering in self.inputs:
                x = entering[start]
                if state is not None:
                    state.start(x)
                x = self.family.run_blocks(x, start, self.depth)
                out.append(output_logits(self.family.forward_head(self.family.final_norm_tokens(x))).float())
                if state is not None:
                    state.finish()
        return torch.cat(out)


# ----------------------------------------------------------------------------- cost

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
    with torch.inference_mode(), _autocast(device, dtype):
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


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- the search

@dataclass
class _Point:
    """An evaluated schedule: its values, spec, token counts, cost and fidelity on the search images."""
    method: str
    values: dict[int, int]
    spec: str
    schedule: Schedule
    cost: float          # predicted seconds (speed-up target) or GMACs (GMACs target)
    agreement: float
    kl: float
    label: str = ""
    weights: dict[int, float] = field(default_factory=dict)  # the shape it was scaled from
    cut: bool = False
    halves: tuple[float, ...] = ()  # KL on the even and on the odd screening images


class _Search:
    """One tune run's search: every method's shapes scaled to the goal, then the best refined."""

    def __init__(self, model: nn.Module, family: TokenFamily, evaluator: Evaluator, reference: Tensor,
                 cost: CostModel, size: Sequence[int], kind: str, advance: Callable[[str], None]) -> None:
        self.model, self.family, self.evaluator, self.reference = model, family, evaluator, reference
        self.cost, self.size, self.kind, self.advance = cost, size, kind, advance
        self.seen: dict[str, _Point] = {}
        self.evaluations = 0

    def cost_of(self, knob: Knob, values: dict[int, int]) -> tuple[float, Schedule]:
        """The predicted cost of ``values`` and their token counts (a one-image probe)."""
        patch(self.model, knob.spec(values))
        schedule = probe(self.model, self.family, self.size, count=self.kind == "gmacs")
        cost = self.cost.seconds_of(schedule, knob.method) if self.kind == "speedup" else schedule.gmacs
        return cost, schedule

    def solve(self, knob: Knob, weights: dict[int, float], cut: bool, goal: float,
              ) -> tuple[dict[int, int], Schedule, float] | None:
        """The least scaling of ``weights`` whose cost reaches ``goal`` (bisection on the amount),
        or None when even the most the shape can remove does not."""
        most = float(knob.patches)
        values = knob.fill(weights, most, cut)
        cost, schedule = self.cost_of(knob, values)
        if cost > goal:
            return None
        lo, hi, best = 0.0, most, (values, schedule, cost)
        while hi - lo > 0.5:
            mid = (lo + hi) / 2
            values = knob.fill(weights, mid, cut)
            cost, schedule = self.cost_of(knob, values)
            if cost <= goal:
                hi, best = mid, (values, schedule, cost)
            else:
                lo = mid
        return best

    def at_goal(self, knob: Knob, weights: dict[int, float], cut: bool, goal: float, label: str) -> _Point | None:
        """The shape ``weights`` scaled to ``goal`` and evaluated (None if it cannot reach the goal)."""
        solved = self.solve(knob, weights, cut, goal)
        if solved is None:
            return None
        values, schedule, cost = solved
        spec = knob.spec(values)
        if spec not in self.seen:
            patch(self.model, spec)
            logits = self.evaluator.logits(knob.first_block(values))
            score = scores_for(self.evaluator.features)[0]
            agreement, kl = score(logits, self.reference)
            halves = tuple(score(logits[h::2], self.reference[h::2])[1] for h in (0, 1))
            self.seen[spec] = _Point(knob.method, dict(values), spec, schedule, cost, agreement, kl, label,
                                     dict(weights), cut, halves)
            self.evaluations += 1
            self.advance(f"{knob.method} {label}: KL {kl:.4f}")
        return self.seen[spec]

    def shapes(self, knob: Knob, goal: float, deadline: float) -> list[_Point]:
        """Every shape of ``knob`` scaled to ``goal`` and evaluated, best (lowest KL) first; the two
        best shapes are also tried with the cut at the last block."""
        found = []
        for label, weights in knob.shapes():
            if time.perf_counter() > deadline and found:
                break
            point = self.at_goal(knob, weights, False, goal, label)
            if point is not None:
                found.append(point)
        found.sort(key=lambda p: p.kl)
        for best in found[:2] if knob.cut is not None else []:
            if time.perf_counter() > deadline:
                break
            cut = self.at_goal(knob, best.weights, True, goal, best.label + ", cut")
            if cut is not None:
                found.append(cut)
        return sorted(found, key=lambda p: p.kl)

    def refine(self, knob: Knob, point: _Point, goal: float, deadline: float) -> _Point:
        """Coordinate search from ``point``: halve or raise one location's weight (or add a
        location), rescaled to the goal; keep a change that :func:`refines` it."""
        improved = True
        while improved and time.perf_counter() < deadline:
            improved = False
            for loc in knob.positions():
                for factor in (0.5, 1.5):
                    if time.perf_counter() > deadline:
                        return point
                    trial = dict(point.weights)
                    trial[loc] = trial.get(loc, 0.5 / factor) * factor
                    new = self.at_goal(knob, trial, point.cut, goal, point.label.split(" (")[0] + " (refined)")
                    if new is not None and refines(new, point):
                        point, improved = new, True
        return point


def embedding_scores(embeddings: Tensor, reference: Tensor) -> tuple[float, float]:
    """A feature extractor's ``(agreement, distance)``, tune's ``(agreement, KL)`` for classifiers:
    neighbour agreement (%) and ``1 -`` the mean cosine similarity to the unreduced embeddings."""
    agreement, cosine = embedding_fidelity(embeddings, reference)
    return agreement, 1.0 - cosine


def scores_for(features: bool) -> tuple[Callable[[Tensor, Tensor], tuple[float, float]],
                                         Callable[[Tensor, Tensor], Tensor]]:
    """The fidelity (agreement, KL-like distance) and per-image kept score (higher is better) tune uses:
    classifiers' agreement / KL / log-probability of the unreduced top-1, or a feature extractor's
    neighbour agreement / ``1 - cosine`` / cosine similarity."""
    return (embedding_scores, cosine_to) if features else (fidelity, kept_logprob)


def refines(new: _Point, old: _Point) -> bool:
    """Whether a refinement step is kept: it lowers the screening KL by more than 3%, and on both
    halves of the screening images (so a step that fits a few images on one half is not: a
    long refinement otherwise drifts to schedules the selection images find far worse)."""
    return new.kl < old.kl * 0.97 and all(n < o for n, o in zip(new.halves, old.halves, strict=True))


# ----------------------------------------------------------------------------- the run

def _load_images(images: str | Path, model: nn.Module, wnids: str | Path | None,
                 limit: int | None) -> tuple[Tensor, Tensor | None]:
    data = image_dataset(images, model, wnids, training=False, limit=limit, labelled=wnids is not None)
    items = [data[i] for i in range(len(data))]
    if len(items) < 2:
        raise TokenSparseError(f"tune needs at least 2 images (a search and a held-out part), found {len(items)} "
                               f"in {str(images)!r}")
    x = torch.stack([im for im, _ in items])
    labels = torch.tensor([lab for _, lab in items])
    return x, (None if bool((labels == UNLABELLED).all()) else labels)


def _batches(x: Tensor, batch_size: int) -> list[Tensor]:
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def default_methods(model: nn.Module) -> list[str]:
    """Every tunable training-free method searched by default that supports ``model`` (``mix`` is
    searched when named)."""
    return [name for name, knob in TUNABLE.items() if knob.by_default and knob.supports(model)]


def _number(text: str) -> float | None:
    """``"1.5"`` or ``"1.5x"`` as a number, else None."""
    try:
        return float(text.strip().removesuffix("x").removesuffix("X"))
    except ValueError:
        return None


def check_methods(methods: Sequence[str] | None, model: nn.Module | None = None) -> list[str] | None:
    """The method names to search (None: the defaults), checked: a list of tunable names (a
    single string is one name), not empty, each supporting ``model`` when given."""
    if methods is None:
        return None
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, (list, tuple)) or not all(isinstance(m, str) for m in methods):
        raise TokenSparseError(f"methods must be a list of method names, got {methods!r}")
    if not methods:
        raise TokenSparseError(f"methods is empty: name methods to search ({', '.join(TUNABLE)}), or leave it out "
                               f"to search every one that supports the model")
    names = list(dict.fromkeys(methods))
    for name in names:
        if name not in TUNABLE:
            raise TokenSparseError(f"tune cannot search method {name!r}; tunable: {', '.join(TUNABLE)}")
        if model is not None and not TUNABLE[name].supports(model):
            supported = [n for n in TUNABLE if TUNABLE[n].supports(model)]
            raise TokenSparseError(f"method {name!r} does not support this model ({_why_not(name, model)}); "
                                   f"tunable here: {', '.join(supported) or 'none'}")
    return names


def _why_not(name: str, model: nn.Module) -> str:
    """Why a tunable method does not support ``model``: the first part that refuses it, in its own words."""
    for part in TUNABLE[name].methods():
        method = get_method(part)()
        if not method.supports(model):
            family = get_family(model)
            if method.needs_class_token and not getattr(family, "has_class_token", False):
                return f"{part} scores tokens by class attention and this model has no class token"
            return f"{part} does not support {family.name} models"
    return "not supported"


def check_target(speedup: float | str | None, gmacs_target: float | None) -> tuple[str, float | str]:
    """``("speedup" | "gmacs", target)``: a speed-up > 1, a method spec (its measured speed-up), or
    GMACs > 0; exactly one of them. A clear error otherwise."""
    if (speedup is None) == (gmacs_target is None):
        raise TokenSparseError("give exactly one target: speedup=X (or a method spec whose measured speed-up to "
                               "match) or gmacs=G")
    if gmacs_target is not None:
        if isinstance(gmacs_target, bool) or not isinstance(gmacs_target, (int, float)) or not gmacs_target > 0 \
                or not math.isfinite(gmacs_target):
            raise TokenSparseError(f"gmacs must be a positive number, got {gmacs_target!r}")
        return "gmacs", float(gmacs_target)
    if isinstance(speedup, str):
        number = _number(speedup)
        if number is not None:  # "1.5" or "1.5x": a number after all
            return check_target(number, None)
        name, options = parse_spec(speedup)
        if name not in REGISTRY and ":" not in speedup:
            raise TokenSparseError(f"speedup must be a number > 1 (e.g. 1.5) or a method spec whose measured speed-up "
                                   f"is the target (e.g. tome:r=13), got {speedup!r}")
        get_method(name)(**options)  # an unknown method or option: the registry's error
        return "speedup", format_spec(name, options)
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not math.isfinite(speedup) \
            or not speedup > 1:
        raise TokenSparseError(f"speedup must be a number > 1 (how many times faster than unreduced), got {speedup!r}")
    return "speedup", float(speedup)


SEARCH_IMAGES = 1024
"""The most even positions used: the first half, at most :data:`SCREEN_IMAGES`, screens schedules,
the rest selects among the finalists (so the choice is not made on the images the screening
fitted, and on as many images as there are: its noise guard needs them); every odd position is
held out for the reported numbers."""
SCREEN_IMAGES = 128
"""The most images a schedule is screened on (each of about a hundred schedules runs on them)."""


@dataclass
class _Setup:
    """What the search and the finalists share: images, references, the cost model, the target."""
    family: TokenFamily
    size: tuple[int, int, int]
    search: Evaluator
    select: Evaluator
    held: Evaluator
    search_reference: Tensor
    select_reference: Tensor
    held_reference: Tensor
    held_labels: Tensor | None
    cost: CostModel
    defaults: dict[str, str]
    target: float
    goal: float
    tokens: int
    kind: str
    base_gmacs: float
    target_row: str | None
    """The row whose measured speed-up is the target (a spec target), or None."""


def _setup(model: nn.Module, family: TokenFamily, images: str | Path, wnids: str | Path | None, limit: int | None,
           search_images: int, names: list[str], kind: str, target_spec: float | str, batch_size: int,
           threads: int | None, dev: torch.device, dtype: str, runs: int, progress: bool) -> _Setup:
    """Images and reference logits, the cost model (calibrated with the defaults' real timing), the target."""
    amp = resolve_dtype(dtype)
    size = input_size(model)
    x, labels = _load_images(images, model, wnids, limit)
    even, held_x = x[0::2][:search_images], x[1::2]
    screened = min((len(even) + 1) // 2, SCREEN_IMAGES)
    screen_x, select_x = even[:screened], even[screened:]
    if len(select_x) == 0:
        raise TokenSparseError(f"tune needs at least 4 images (to search, select and hold out), found {len(x)}")
    with progress_bar("tune: setup", 4, progress) as advance:
        features = not is_classifier(model)
        search = Evaluator(model, family, _batches(screen_x, batch_size), dev, amp, resume=True, features=features)
        select = Evaluator(model, family, _batches(select_x, batch_size), dev, amp, features=features)
        held = Evaluator(model, family, _batches(held_x, batch_size), dev, amp, features=features)
        search_ref, select_ref, held_ref = search.logits(), select.logits(), held.logits()
        advance()
        with torch.inference_mode(), _autocast(dev, amp):
            n_all, P = int(family.run_to(screen_x[:1].to(dev), 0).shape[1]), family.num_prefix
        grid = sorted({max(P + 1, round(P + (n_all - P) * f)) for f in GRID})
        timed = list(dict.fromkeys(m for name in names for m in TUNABLE[name].methods()))
        defaults = {name: name for name in timed}
        target_row = None
        if isinstance(target_spec, str):  # time the target spec as a default (or the default it equals)
            target_row = next((name for name in timed if _same_config(target_spec, name)), target_spec)
            defaults[target_row] = target_row
        variants = build_variants(model, list(defaults.values()))

        def measure_costs() -> tuple[CostModel, dict[str, list[float]]]:
            """Block and embedding timings, the defaults timed for real, and the cost model from them."""
            blocks = time_blocks(family, batch_size, grid, dev, amp)
            fixed = _time_embedding(family, even[:batch_size], dev, amp)
            times = timed_runs(variants, batch_size=batch_size, input_size=size, threads=threads, device=dev,
                               dtype=dtype, warmup=1, runs=runs)
            cost = CostModel(grid, blocks, statistics.median(times[BASELINE]), fixed, len(family.blocks))
            for name in timed:
                patch(model, name)
                sched = probe(model, family, size, count=False)
                extra = statistics.median(times[name]) - cost.raw(sched)
                cost.overhead[name] = max(0.0, extra) / max(1, sched.reductions)
            for name in names:  # a schedule of several methods: their mean work per reducing block
                parts = TUNABLE[name].parts
                if parts:
                    cost.overhead[name] = statistics.mean(cost.overhead[m] for m in parts)
            unpatch(model)
            return cost, times

        def speed_target(cost: CostModel, times: dict[str, list[float]]) -> tuple[float, float]:
            """The target speed-up and the most any schedule can reach (a single patch token after block 0)."""
            target = cost.total / statistics.median(times[target_row]) if target_row is not None else target_spec
            return target, cost.total / (cost.fixed + cost.block(n_all) + (len(family.blocks) - 1) * cost.block(P + 1))

        cost, times = measure_costs()
        advance(3)
        if kind == "speedup":
            target, ceiling = speed_target(cost, times)
            if not 1.0 < target < ceiling:  # a verdict from one noisy timing is timed again before it is given
                cost, times = measure_costs()
                target, ceiling = speed_target(cost, times)
    unreduced = cost.total
    base_gmacs = gmacs(model, size)
    if kind == "speedup":
        if target <= 1.0:
            raise TokenSparseError(f"{target_spec} measured {target:.2f}x here (timed twice), not faster than the "
                                   f"unreduced model: nothing to tune for")
        if target >= ceiling:
            raise TokenSparseError(f"a speed-up of {target:.2f}x is out of reach here: even keeping a single patch "
                                   f"token after the first block gives at most {ceiling:.2f}x (timed twice; a busy "
                                   f"machine lowers this: close other work and run again)")
        goal = unreduced / (target * (1 + MARGIN))
    else:
        target = goal = float(target_spec)
        if target >= base_gmacs:
            raise TokenSparseError(f"the unreduced model has {base_gmacs:.3f} GMACs, no more than the target "
                                   f"{target:g}: give a smaller target")
        patch(model, format_spec("topk", {"tokens": 1, "locations": [1]}))
        floor = probe(model, family, size).gmacs
        unpatch(model)
        if target <= floor:
            raise TokenSparseError(f"{target:g} GMACs is out of reach: even keeping a single patch token after the "
                                   f"first block takes {floor:.3f} GMACs")
    return _Setup(family, size, search, select, held, search_ref, select_ref, held_ref,
                  None if labels is None else labels[1::2], cost, defaults, float(target), goal, n_all - P, kind,
                  base_gmacs, target_row)


GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Token counts the cost model times a block at, as shares of the patch tokens."""
MARGIN = 0.02
"""The search aims this much past a speed-up target: the final timing, on a busy machine, varies."""


def _time_embedding(family: TokenFamily, images: Tensor, device: torch.device, dtype: torch.dtype) -> float:
    """Median seconds of the model's embedding (everything before block 0) on one batch."""
    images = images.to(device)
    times = []
    with torch.inference_mode(), _autocast(device, dtype):
        for _ in range(4):
            synchronize(device)
            start = time.perf_counter()
            family.run_to(images, 0)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def tune(model: nn.Module, images: str | Path, *, speedup: float | str | None = None,
         gmacs: float | None = None, methods: Sequence[str] | None = None, wnids: str | Path | None = None,
         batch_size: int = 64, threads: int | None = None, device: str = "cpu", dtype: str = "fp32",
         budget: float = 10.0, limit: int | None = None, search_images: int = SEARCH_IMAGES, runs: int = 8,
         progress: bool = True) -> TuneResult:
    """Find the schedule closest to the unreduced ``model`` (an unpatched timm ViT or transformers
    classifier with trained weights) that is ``speedup`` times faster on this machine, or has at
    most ``gmacs`` GMACs per image. See the module docstring for how.

    ``speedup``: a number > 1, or a method spec whose speed-up, measured in this run, is the
    target (``"tome:r=13"``: as fast as ToMe at its default). ``images``: any image folder
    (``wnids`` adds top-1 on the held-out images): the first ``search_images`` even positions
    are searched on (the first half, at most 128, screen; the rest select), every odd position is
    held out. ``budget``: minutes for the whole run. ``runs``: timed rounds of the setup's and the final interleaved
    timing. The model is returned unpatched, in eval mode.
    """
    t0 = time.perf_counter()
    kind, target_spec = check_target(speedup, gmacs)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise TokenSparseError(f"budget must be a positive number of minutes, got {budget!r}")
    batch_size, runs = positive_int(batch_size, "batch_size"), positive_int(runs, "runs")
    if not isinstance(images, (str, os.PathLike)):
        raise TokenSparseError(f"images must be the path of an image folder, got a {type(images).__name__}")
    if not isinstance(model, nn.Module):
        raise TokenSparseError(f"model must be a torch.nn.Module, got a {type(model).__name__}")
    if is_patched(model):
        raise TokenSparseError("tune takes the unreduced model: call tokensparse.unpatch(model) first")
    family = get_family(model)
    if not isinstance(family, TokenFamily) or not family.reducible:
        raise TokenSparseError(f"tune searches token schedules of ViT-style models; {family.description} is not one")
    names = check_methods(methods, model) or default_methods(model)
    if not names:
        raise TokenSparseError("no tunable method supports this model")
    dev = measurement_device(device)
    model.eval().to(dev)
    with num_threads(threads), eval_mode(model):
        setup = _setup(model, family, images, wnids, limit, positive_int(search_images, "search_images"), names,
                       kind, target_spec, batch_size, threads, dev, dtype, runs, progress)
        # leave time for the finalists: each is timed (runs + 1 passes) and run over the held-out images
        eval_passes = (setup.held.size + setup.select.size) / batch_size
        rows = len(setup.defaults) + FINALIST_METHODS + REFINED_METHODS + len(FRONT_LEVELS) + 1
        finish_s = rows * (runs + 1 + eval_passes) * setup.cost.total * 0.8
        if kind == "speedup":  # close calls timed again: about half the rows, with the unreduced model
            finish_s += (CLOSE_TIMINGS - 1) * (rows // 2 + 1) * (runs + 1) * setup.cost.total * 0.8
        deadline = t0 + budget * 60 - min(finish_s, 0.5 * budget * 60)
        search_start = time.perf_counter()
        with progress_bar("tune: search", 1, progress) as advance:
            search = _Search(model, family, setup.search, setup.search_reference, setup.cost, setup.size, kind,
                             lambda info: advance(0, info))
            best = _search(search, names, setup, deadline)
            advance(1)
            unpatch(model)
        counts = Counter(p.method for p in search.seen.values())
        search_s = time.perf_counter() - search_start
        rows = _finalists(best, setup.defaults, setup.cost)
        kept = _measure_finalists(model, rows, setup, batch_size, threads, dev, dtype, runs, progress)
    target = setup.target
    notes = [f"schedules evaluated: {', '.join(f'{n} {counts[n]}' for n in names)}",
             (f"images: {setup.search.size} screened on, {setup.select.size} chosen on, {setup.held.size} held out "
              f"(every number reported)")]
    if setup.held.size < FEW_HELD_OUT:
        notes.append(f"only {setup.held.size} held-out image{'s' * (setup.held.size != 1)}: one image is "
                     f"{100 / setup.held.size:.1f} points of agreement or top-1; give a folder of a few hundred "
                     f"images for numbers to trust")
    if setup.target_row is not None:
        target = next(r for r in rows if r.spec == setup.target_row).speedup
        notes.append(f"target: {target_spec} measured {target:.2f}x in the final timing")
    choice, met = _choose(rows, kind, target, kept)
    choice.role = "chosen"
    if not met:
        notes.append("no schedule met the target in the final timing: the choice is the closest one found "
                     "(a larger budget searches further)")
    front = _pareto(rows, kind)
    seconds = time.perf_counter() - t0
    if seconds > 1.1 * budget * 60:
        notes.append(f"the run took {seconds:.0f} s, over its budget of {budget * 60:.0f} s: the budget stops the "
                     f"search early, but the setup (reading the images, the reference passes, timing the defaults: "
                     f"{search_start - t0:.0f} s here) and measuring the finalists run whole")
    return TuneResult(rows, front, choice, target, kind, met, seconds, search_s, notes, setup.held.features)


FINALIST_METHODS = 3
"""Methods whose best schedule is timed for real (the best by screening KL)."""
FEW_HELD_OUT = 50
"""Fewer held-out images than this get a note: their numbers move by more than 2 points an image."""
REFINED_METHODS = 2
"""Methods whose best shape is refined location by location (the best by screening KL)."""
FRONT_LEVELS = (0.5, 0.75)
"""Besides the target, the best schedule's shape is also scaled to these shares of the target's
speed-up (or GMACs saving), for the front."""


def _search(search: _Search, names: list[str], setup: _Setup, deadline: float) -> list[tuple[_Point, str]]:
    """Every method's shapes at the goal (70% of the time, split evenly), then the two best methods'
    best shapes refined (the rest), and the best shape scaled to the front levels. Returns the
    points to time and their roles: the best shape at the goal of the three best methods and
    the refinements (``finalist``), and front points (``path``)."""
    family = setup.family
    knobs = {name: TUNABLE[name](len(family.blocks), setup.tokens, family.num_prefix) for name in names}
    found: dict[str, list[_Point]] = {}
    shape_end = time.perf_counter() + 0.7 * (deadline - time.perf_counter())
    counts = {name: len(knobs[name].shapes()) + 2 for name in names}
    for i, name in enumerate(names):
        share = (shape_end - time.perf_counter()) * counts[name] / sum(counts[n] for n in names[i:])
        found[name] = search.shapes(knobs[name], setup.goal, time.perf_counter() + share)
    ranked = sorted((name for name in names if found[name]), key=lambda n: found[n][0].kl)
    out = [(found[name][0], "finalist") for name in ranked[:FINALIST_METHODS]]
    for i, name in enumerate(ranked[:REFINED_METHODS]):
        share = (deadline - time.perf_counter()) / (min(REFINED_METHODS, len(ranked)) - i)
        refined = search.refine(knobs[name], found[name][0], setup.goal, time.perf_counter() + share)
        if refined is not found[name][0]:
            out.append((refined, "finalist"))
    if ranked:
        top = found[ranked[0]][0]
        for level in FRONT_LEVELS:
            point = search.at_goal(knobs[top.method], top.weights, top.cut, _level_goal(setup, level),
                                   f"{level:g} of the way to the target")
            if point is not None:
                out.append((point, "path"))
    return out


def _level_goal(setup: _Setup, level: float) -> float:
    """The cost ``level`` of the way from no reduction to the goal (speed-up, or GMACs saved)."""
    if setup.kind == "speedup":
        return setup.cost.total / (1 + level * (setup.cost.total / setup.goal - 1))
    return setup.base_gmacs - level * (setup.base_gmacs - setup.goal)


def _finalists(points: list[tuple[_Point, str]], defaults: dict[str, str], cost: CostModel) -> list[Candidate]:
    """Rows to time: the unreduced model, the defaults and the searched points."""
    rows = [Candidate(BASELINE, BASELINE, "unreduced")]
    rows += [Candidate(spec, parse_spec(spec)[0], "default") for spec in defaults.values()]
    for p, role in points:
        if all(r.spec != p.spec for r in rows):
            rows.append(Candidate(p.spec, p.method, role, gmacs=p.schedule.gmacs,
                                  predicted_speedup=cost.total / cost.seconds_of(p.schedule, p.method),
                                  search_agreement=p.agreement, search_kl=p.kl))
    return rows


def _measure_finalists(model: nn.Module, rows: list[Candidate], setup: _Setup, batch_size: int,
                       threads: int | None, device: torch.device, dtype: str, runs: int,
                       progress: bool) -> dict[str, Tensor]:
    """Every row's GMACs, fidelity on the selection images and on the held-out ones, and its speed-up
    timed for real, interleaved with the unreduced model in one run. Rows within :data:`CLOSE`
    of a speed-up target (and the target's row) are timed twice more, interleaved again: their
    speed-up is the median of the three. Returns each reduced row's per-image
    :func:`~tokensparse.measure.kept_logprob` on the selection images."""
    kept: dict[str, Tensor] = {}
    score, per_image = scores_for(setup.held.features)
    with progress_bar("tune: finalists", len(rows) + 1, progress) as advance:
        for r in rows:
            if r.spec == BASELINE:
                r.gmacs = gmacs(model, setup.size)
                logits = setup.held_reference
            else:
                patch(model, r.spec)
                r.gmacs = probe(model, setup.family, setup.size).gmacs
                selected = setup.select.logits()
                r.select_agreement, r.select_kl = score(selected, setup.select_reference)
                kept[r.spec] = per_image(selected, setup.select_reference)
                r.select_logp = kept[r.spec].mean().item()
                logits = setup.held.logits()
                unpatch(model)
            r.agreement, r.kl = score(logits, setup.held_reference)
            if setup.held_labels is not None and not setup.held.features:
                r.top1 = 100.0 * (logits.argmax(-1).cpu() == setup.held_labels).float().mean().item()
            advance()
        variants = build_variants(model, [r.spec for r in rows])
        time_kw = {"batch_size": batch_size, "input_size": setup.size, "threads": threads, "device": device,
                   "dtype": dtype, "warmup": 1, "runs": runs}
        speedups = _speedups(timed_runs(variants, **time_kw))
        advance()
        close = _close_calls(rows, speedups, setup) if setup.kind == "speedup" else []
        for _ in range(CLOSE_TIMINGS - 1 if close else 0):  # a close call is timed again, medians pooled
            again = _speedups(timed_runs({name: variants[name] for name in [BASELINE, *close]}, **time_kw))
            for name in close:
                speedups[name].extend(again[name])
    for r in rows:
        r.speedup, r.timings = statistics.median(speedups[r.spec]), len(speedups[r.spec])
    rows.sort(key=lambda r: r.speedup)
    return kept


CLOSE = 0.05
"""A measured speed-up within this share of the target is a close call."""
CLOSE_TIMINGS = 3
"""Interleaved timings of a close call (the first included): the speed-up is their median."""


def _speedups(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """One timing's speed-up of every model over the unreduced one (ratio of medians), as a list."""
    base = statistics.median(times[BASELINE])
    return {name: [base / statistics.median(t)] for name, t in times.items()}


def _close_calls(rows: list[Candidate], speedups: dict[str, list[float]], setup: _Setup) -> list[str]:
    """Rows whose first measured speed-up is within :data:`CLOSE` of the target, and the target's
    own row (a spec target is measured too) when there are any."""
    target = speedups[setup.target_row][0] if setup.target_row is not None else setup.target
    close = [r.spec for r in rows if r.role != "unreduced" and r.spec != setup.target_row
             and abs(speedups[r.spec][0] / target - 1) <= CLOSE]
    if close and setup.target_row is not None:
        close.append(setup.target_row)
    return close


def _same_config(a: str, b: str) -> bool:
    """Whether two specs name the same method with the same options (defaults filled in)."""
    (na, oa), (nb, ob) = parse_spec(a), parse_spec(b)
    return na == nb and get_method(na)(**oa).config == get_method(nb)(**ob).config


def _meets(r: Candidate, kind: str, target: float) -> bool:
    return (r.speedup or 0) >= target if kind == "speedup" else (r.gmacs or math.inf) <= target + 1e-9


NOISE_Z = 2.0
"""A searched schedule is preferred to the best hand-set default only when its mean kept
log-probability on the selection images is higher by more than this many standard errors of
the per-image differences (paired: the same images)."""


def _rank(r: Candidate) -> tuple[float, float]:
    """How a row ranks on the selection images: kept log-probability, KL breaking ties."""
    return (r.select_logp, -r.select_kl)


def beyond_noise(new: Tensor, old: Tensor, z: float = NOISE_Z) -> bool:
    """Whether per-image scores ``new`` beat ``old`` (the same images) by more than ``z`` standard
    errors of their paired differences."""
    d = (new - old).double()
    if d.numel() < 2:
        return False
    se = d.std().item() / math.sqrt(d.numel())
    return d.mean().item() > z * se


def _choose(rows: list[Candidate], kind: str, target: float,
            kept: dict[str, Tensor] | None = None) -> tuple[Candidate, bool]:
    """Among reduced rows meeting the target, the best hand-set default by the selection images'
    kept log-probability, unless a searched schedule beats it by more than their noise
    (:func:`beyond_noise`): then the best such schedule. Without such rows, the row closest to
    the target."""
    reduced = [r for r in rows if r.role != "unreduced"]
    ok = [r for r in reduced if _meets(r, kind, target)]
    if ok:
        defaults = [r for r in ok if r.role == "default"]
        if not defaults or kept is None:
            return max(ok, key=_rank), True
        incumbent = max(defaults, key=_rank)
        beating = [r for r in ok if r.role != "default" and beyond_noise(kept[r.spec], kept[incumbent.spec])]
        return max([incumbent, *beating], key=_rank), True
    if kind == "speedup":
        return max(reduced, key=lambda r: r.speedup or 0), False
    return min(reduced, key=lambda r: r.gmacs or math.inf), False


def _pareto(rows: list[Candidate], kind: str) -> list[Candidate]:
    """Rows no other row beats on both speed (measured speed-up, or GMACs) and held-out KL."""
    def better(a: Candidate, b: Candidate) -> bool:
        fa, fb = (a.speedup, b.speedup) if kind == "speedup" else (-a.gmacs, -b.gmacs)
        return fa >= fb and a.kl <= b.kl and (fa > fb or a.kl < b.kl)
    front = [r for r in rows if not any(better(o, r) for o in rows if o is not r)]
    for r in rows:
        r.pareto = r in front
    return front


# ----------------------------------------------------------------------------- output

def write_tune_csv(rows: Sequence[Candidate], path: str | Path) -> Path:
    """Every measured row (atomically), with the columns of :class:`Candidate`."""
    return write_rows_csv(rows, Candidate, path)


def plot_tune(result: TuneResult, out: str | Path | None = None, title: str = "") -> Figure:
    """Held-out KL and agreement against measured speed-up (or GMACs): the front, the hand-set
    defaults, the choice and the target."""
    speed = result.target_kind == "speedup"
    x_of = (lambda r: r.speedup) if speed else (lambda r: r.gmacs)
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    labels = (("1 - mean cosine similarity to unreduced embeddings, held-out",
               "nearest-neighbour agreement with unreduced (%), held-out") if result.features else
              ("mean KL(unreduced || reduced), held-out", "agreement with unreduced (%), held-out"))
    for ax, metric, label in ((axes[0], "kl", labels[0]), (axes[1], "agreement", labels[1])):
        front = sorted(result.front, key=x_of)
        ax.plot([x_of(r) for r in front], [getattr(r, metric) for r in front], "-", color="0.6", label="Pareto front")
        for role, style in (("path", {"marker": "o", "color": "tab:blue", "label": "searched"}),
                            ("finalist", {"marker": "s", "color": "tab:green", "label": "searched at the target"}),
                            ("default", {"marker": "^", "color": "tab:red", "label": "hand-set defaults"})):
            pts = [r for r in result.rows if r.role == role]
            if pts:
                ax.plot([x_of(r) for r in pts], [getattr(r, metric) for r in pts], linestyle="none", **style)
            for r in pts if role == "default" else []:
                ax.annotate(r.spec, (x_of(r), getattr(r, metric)), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        c = result.choice
        ax.plot([x_of(c)], [getattr(c, metric)], marker="*", markersize=15, color="black", linestyle="none",
                label="chosen")
        ax.axvline(result.target, color="0.3", linestyle=":", label="target")
        ax.set_xlabel("measured speed-up vs unreduced (x)" if speed else "GMACs per image")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if out is not None:
        save_figure(fig, out)
    return fig

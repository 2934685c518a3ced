"""The search: fidelity of candidate schedules on the screening images (:class:`Evaluator`), shapes scaled
to the target by bisection and refined one location at a time (:class:`Search`)."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..api import is_patched, patch, token_state
from ..families import TokenFamily
from ..measure import (
    cosine_to,
    embedding_fidelity,
    embedding_of,
    fidelity,
    kept_logprob,
)
from ..utils import output_logits
from .cost import CostModel, Schedule, probe
from .space import Knob


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
        with torch.inference_mode(), self.autocast_for():
            for images in batches:
                x = family.run_to(images.to(device), 0)
                entering = [x]
                if resume:
                    for i in range(self.depth - 1):
                        x = family.run_blocks(x, i, i + 1)
                        entering.append(x)
                self.inputs.append(entering)

    def autocast_for(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def logits(self, start: int = 0) -> Tensor:
        """Logits of the model as patched now, from block ``start`` on (``start`` > 0: the model
        reduces nothing before it, and the evaluator keeps every block's input); a feature
        extractor's embeddings (:func:`~tokensparse.measure.embedding_of`) from the whole model."""
        if self.features:
            with torch.inference_mode(), self.autocast_for():
                return torch.cat([embedding_of(self.model(images[0])).float() for images in self.inputs])
        state = token_state(self.model) if is_patched(self.model) else None
        out = []
        with torch.inference_mode(), self.autocast_for():
            for entering in self.inputs:
                x = entering[start]
                if state is not None:
                    state.start(x)
                x = self.family.run_blocks(x, start, self.depth)
                out.append(output_logits(self.family.forward_head(self.family.final_norm_tokens(x))).float())
                if state is not None:
                    state.finish()
        return torch.cat(out)


@dataclass
class Point:
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


class Search:
    """One tune run's search: every method's shapes scaled to the goal, then the best refined."""

    def __init__(self, model: nn.Module, family: TokenFamily, evaluator: Evaluator, reference: Tensor,
                 cost: CostModel, size: Sequence[int], kind: str, advance: Callable[[str], None]) -> None:
        self.model, self.family, self.evaluator, self.reference = model, family, evaluator, reference
        self.cost, self.size, self.kind, self.advance = cost, size, kind, advance
        self.seen: dict[str, Point] = {}
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

    def at_goal(self, knob: Knob, weights: dict[int, float], cut: bool, goal: float, label: str) -> Point | None:
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
            self.seen[spec] = Point(knob.method, dict(values), spec, schedule, cost, agreement, kl, label,
                                     dict(weights), cut, halves)
            self.evaluations += 1
            self.advance(f"{knob.method} {label}: KL {kl:.4f}")
        return self.seen[spec]

    def shapes(self, knob: Knob, goal: float, deadline: float) -> list[Point]:
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

    def refine(self, knob: Knob, point: Point, goal: float, deadline: float) -> Point:
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


def refines(new: Point, old: Point) -> bool:
    """Whether a refinement step is kept: it lowers the screening KL by more than 3%, and on both
    halves of the screening images (so a step that fits a few images on one half is not: a
    long refinement otherwise drifts to schedules the selection images find far worse)."""
    return new.kl < old.kl * 0.97 and all(n < o for n, o in zip(new.halves, old.halves, strict=True))

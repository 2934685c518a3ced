"""The run: images and checks, the setup (reference logits, the cost model calibrated with the defaults' real
timing), the search, the finalists timed for real and the choice (:func:`tune`)."""
from __future__ import annotations

import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..api import is_patched, patch, unpatch
from ..data import UNLABELLED, image_dataset, input_size
from ..errors import TokenSparseError
from ..families import TokenFamily, get_family
from ..measure import (
    BASELINE,
    build_variants,
    gmacs,
    is_classifier,
    timed_runs,
)
from ..measure._common import measurement_device, resolve_dtype
from ..measure.speed import num_threads
from ..methods import REGISTRY, get_method
from ..spec import format_spec, parse_spec
from ..utils import eval_mode, positive_int, progress_bar
from .cost import GRID, CostModel, autocast_for, probe, time_blocks, time_embedding
from .report import Candidate, TuneResult, pareto
from .search import Evaluator, Point, Search, scores_for
from .space import TUNABLE


def load_images(images: str | Path, model: nn.Module, wnids: str | Path | None,
                 limit: int | None) -> tuple[Tensor, Tensor | None]:
    data = image_dataset(images, model, wnids, training=False, limit=limit, labelled=wnids is not None)
    items = [data[i] for i in range(len(data))]
    if len(items) < 2:
        raise TokenSparseError(f"tune needs at least 2 images (a search and a held-out part), found {len(items)} "
                               f"in {str(images)!r}")
    x = torch.stack([im for im, _ in items])
    labels = torch.tensor([lab for _, lab in items])
    return x, (None if bool((labels == UNLABELLED).all()) else labels)


def batches(x: Tensor, batch_size: int) -> list[Tensor]:
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


def make_setup(model: nn.Module, family: TokenFamily, images: str | Path, wnids: str | Path | None, limit: int | None,
           search_images: int, names: list[str], kind: str, target_spec: float | str, batch_size: int,
           threads: int | None, dev: torch.device, dtype: str, runs: int, progress: bool) -> _Setup:
    """Images and reference logits, the cost model (calibrated with the defaults' real timing), the target."""
    amp = resolve_dtype(dtype)
    size = input_size(model)
    x, labels = load_images(images, model, wnids, limit)
    even, held_x = x[0::2][:search_images], x[1::2]
    screened = min((len(even) + 1) // 2, SCREEN_IMAGES)
    screen_x, select_x = even[:screened], even[screened:]
    if len(select_x) == 0:
        raise TokenSparseError(f"tune needs at least 4 images (to search, select and hold out), found {len(x)}")
    with progress_bar("tune: setup", 4, progress) as advance:
        features = not is_classifier(model)
        search = Evaluator(model, family, batches(screen_x, batch_size), dev, amp, resume=True, features=features)
        select = Evaluator(model, family, batches(select_x, batch_size), dev, amp, features=features)
        held = Evaluator(model, family, batches(held_x, batch_size), dev, amp, features=features)
        search_ref, select_ref, held_ref = search.logits(), select.logits(), held.logits()
        advance()
        with torch.inference_mode(), autocast_for(dev, amp):
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
            fixed = time_embedding(family, even[:batch_size], dev, amp)
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


MARGIN = 0.02
"""The search aims this much past a speed-up target: the final timing, on a busy machine, varies."""


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
        setup = make_setup(model, family, images, wnids, limit, positive_int(search_images, "search_images"), names,
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
            search = Search(model, family, setup.search, setup.search_reference, setup.cost, setup.size, kind,
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
    front = pareto(rows, kind)
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


def _search(search: Search, names: list[str], setup: _Setup, deadline: float) -> list[tuple[Point, str]]:
    """Every method's shapes at the goal (70% of the time, split evenly), then the two best methods'
    best shapes refined (the rest), and the best shape scaled to the front levels. Returns the
    points to time and their roles: the best shape at the goal of the three best methods and
    the refinements (``finalist``), and front points (``path``)."""
    family = setup.family
    knobs = {name: TUNABLE[name](len(family.blocks), setup.tokens, family.num_prefix) for name in names}
    found: dict[str, list[Point]] = {}
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


def _finalists(points: list[tuple[Point, str]], defaults: dict[str, str], cost: CostModel) -> list[Candidate]:
    """Rows to time: the unreduced model, the defaults and the searched points."""
    rows = [Candidate(BASELINE, BASELINE, "unreduced")]
    rows += [Candidate(parse_spec(spec)[0], spec, "default") for spec in defaults.values()]
    for p, role in points:
        if all(r.spec != p.spec for r in rows):
            rows.append(Candidate(p.method, p.spec, role, gmacs=p.schedule.gmacs,
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

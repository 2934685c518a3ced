"""Accuracy against speed-up: sweep each method's main knob and plot the trade-off.

Every variant (and the unreduced model) is measured in one run: GMACs, throughput timed
interleaved with the unreduced model, and top-1 / top-5 / agreement in one pass over the
images. :data:`GRIDS` holds the swept values per method; unregistered methods are skipped.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from matplotlib.figure import Figure
from torch import nn

from .errors import TokenSparseError
from .measure import BASELINE, MeasuredRow, build_variants, measure_variants, measured, random_predictors
from .methods import REGISTRY, get_method
from .spec import format_spec, parse_spec
from .utils import write_rows_csv
from .viz import finish_figure

#: method name -> (option swept, values); one table for every method.
GRIDS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "topk": ("keep_rate", (0.5, 0.6, 0.7, 0.8, 0.9)),
    "evit": ("keep_rate", (0.5, 0.6, 0.7, 0.8, 0.9)),
    "tome": ("r", (4, 8, 12, 16)),
    "mctf": ("r", (8, 12, 16, 20)),
    "tofu": ("r", (4, 8, 12, 16)),
    "pitome": ("ratio", (0.95, 0.925, 0.9, 0.875)),
    "zerotprune": ("r", (4, 8, 12, 16)),
    "ppt": ("r", (15, 30, 45, 60)),
    "evovit": ("keep_rate", (0.3, 0.5, 0.7, 0.9)),
    "dynamicvit": ("rho", (0.5, 0.6, 0.7, 0.8, 0.9)),
}


@dataclass
class SweepRow(MeasuredRow):
    """One CSV row: a method at one knob value (or the unreduced model); ``img_per_s`` and ``top5``
    besides :class:`~tokensparse.measure.MeasuredRow`'s numbers. ``columns``: the CSV's column order."""
    columns: ClassVar[tuple[str, ...]] = ("method", "spec", "knob", "value", "gmacs", "img_per_s", "speedup",
                                          "top1", "top5", "agreement", "cosine")
    knob: str = ""
    value: float | None = None
    img_per_s: float | None = measured()
    top5: float | None = measured()
    cosine: float | None = measured()
    """A feature extractor's mean cosine similarity to the unreduced embeddings (``agreement``: its
    nearest-neighbour agreement; see :mod:`tokensparse.measure.embedding`)."""


def pick(values: Sequence[Any], points: int | None) -> list[Any]:
    """``points`` values spread evenly over ``values`` (ends included); all when None."""
    if points is None or points >= len(values):
        return list(values)
    if points == 1:
        return [values[len(values) // 2]]
    step = (len(values) - 1) / (points - 1)
    return [values[round(i * step)] for i in range(points)]


def sweep_specs(methods: Sequence[str] | None = None, points: int | None = None,
                model: nn.Module | None = None) -> list[SweepRow]:
    """Rows (unmeasured) for every swept spec, the unreduced model first.

    ``methods``: names from :data:`GRIDS`, or specs ``NAME:key=value,...`` whose options stay
    fixed while the knob is swept (e.g. ``dynamicvit:predictors=FILE``). Default: every
    method in :data:`GRIDS` that supports ``model`` and works without training. An unknown
    or unswept name is an error, and so is a method that needs training given without its
    trained parts (``dynamicvit`` without ``predictors=FILE``).
    """
    if methods is None:
        chosen = [(n, {}) for n in GRIDS if n in REGISTRY and not get_method(n).needs_training
                  and (model is None or get_method(n)().supports(model))]
        if not chosen:
            raise TokenSparseError(
                "no training-free method supports this model; name one with --method (e.g. "
                "--method dynamicvit:predictors=FILE with predictors from 'tokensparse calibrate')")
    else:
        chosen = []
        for text in dict.fromkeys(m.strip() for m in methods):
            name, fixed = parse_spec(text)
            get_method(name)(**fixed)  # unknown method or option -> error listing the valid ones
            if name not in GRIDS:
                raise TokenSparseError(f"no sweep grid for method {name!r}; swept: {', '.join(GRIDS)}")
            if GRIDS[name][0] in fixed:
                raise TokenSparseError(f"{text!r} fixes {GRIDS[name][0]!r}, the option the sweep varies")
            if random_predictors(format_spec(name, fixed)):
                raise TokenSparseError(
                    f"method {name!r} needs trained predictors to be swept (random ones give meaningless "
                    f"accuracy): pass --method '{name}:predictors=FILE' with a file from 'tokensparse calibrate' "
                    f"or 'tokensparse train'")
            chosen.append((name, fixed))
    rows = [SweepRow(BASELINE, BASELINE)]
    for name, fixed in chosen:
        knob, values = GRIDS[name]
        rows += [SweepRow(name, format_spec(name, {**fixed, knob: v}), knob, v) for v in pick(values, points)]
    return rows


def build_models(base: nn.Module, rows: Sequence[SweepRow]) -> dict[str, nn.Module]:
    """``{spec: model}``: the base for ``none``, patched deep copies for the rest."""
    return build_variants(base, [r.spec for r in rows])


def measure(rows: Sequence[SweepRow], models: dict[str, nn.Module],
            images: str | Path | None, wnids: str | Path | None = None,
            limit: int | None = None, batch_size: int = 32, threads: int | None = None,
            runs: int = 5, warmup: int = 1, progress: bool = True) -> list[SweepRow]:
    """Fill in GMACs, throughput, speed-up and (with ``images``) accuracy of every row
    (:func:`tokensparse.measure.measure_variants`, the unreduced row as the baseline)."""
    results = measure_variants(models, BASELINE, images, wnids, limit=limit, batch_size=batch_size,
                               threads=threads, runs=runs, warmup=warmup, progress=progress)
    columns = {f.name for f in fields(SweepRow)}
    for row in rows:
        for key, value in results[row.spec].items():
            if key in columns:
                setattr(row, key, value)
    return list(rows)


def write_csv(rows: Sequence[SweepRow], path: str | Path) -> Path:
    """Write rows (atomically) with the columns :attr:`SweepRow.columns`."""
    return write_rows_csv(rows, SweepRow, path)


#: x axes of :func:`plot_sweep`: row -> x value, and the axis label.
X_AXES: dict[str, str] = {
    "speedup": "measured speed-up vs unreduced (x)",
    "gmacs": "GMACs reduction vs unreduced (x, unreduced GMACs / GMACs)",
}


def x_values(rows: Sequence[SweepRow], x: str) -> list[float | None]:
    """The x coordinate of every row: measured speed-up, or unreduced GMACs / GMACs."""
    if x == "speedup":
        return [r.speedup for r in rows]
    if x == "gmacs":
        base = next((r.gmacs for r in rows if r.method == BASELINE), None)
        return [None if base is None or not r.gmacs else base / r.gmacs for r in rows]
    raise TokenSparseError(f"x axis must be one of {', '.join(X_AXES)}, got {x!r}")


def _panel(ax: Any, rows: Sequence[SweepRow], xs: Sequence[float | None], metric: str,
           label: str) -> None:
    """One accuracy panel: a line per method in knob order, the unreduced model starred."""
    methods = list(dict.fromkeys(r.method for r in rows if r.method != BASELINE))
    for name in methods:
        pts = sorted((r.value, x, getattr(r, metric)) for r, x in zip(rows, xs)
                     if r.method == name and x is not None and getattr(r, metric) is not None)
        if not pts:
            continue
        _, px, py = zip(*pts)
        line, = ax.plot(px, py, marker="o", label=f"{name} ({rows_knob(rows, name)})")
        for v, x, y in pts:
            ax.annotate(f"{v:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points",
                        color=line.get_color())
    for r, x in zip(rows, xs):
        if r.method == BASELINE and x is not None and getattr(r, metric) is not None:
            ax.plot([x], [getattr(r, metric)], marker="*", markersize=14, color="black",
                    linestyle="none", label="unreduced")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)


def rows_knob(rows: Sequence[SweepRow], method: str) -> str:
    """The knob name swept for ``method`` in ``rows``."""
    return next((r.knob for r in rows if r.method == method), "")


def plot_sweep(rows: Sequence[SweepRow], out: str | Path | None = None,
               title: str = "", x: str = "speedup") -> Any:
    """Figure of top-1 and agreement (a feature extractor's cosine similarity and neighbour agreement;
    GMACs without accuracy) against ``x`` (see :data:`X_AXES`).

    Each method's points are joined in knob order and labelled with the knob value. The
    figure is a plain :class:`matplotlib.figure.Figure` (no pyplot, the global backend is left
    alone).
    """
    xs = x_values(rows, x)
    if any(r.cosine is not None for r in rows):
        panels = [("cosine", "cosine similarity to unreduced embedding"),
                  ("agreement", "nearest-neighbour agreement with unreduced (%)")]
    elif any(r.top1 is not None for r in rows):
        panels = [("top1", "top-1 (%)"), ("agreement", "agreement with unreduced (%)")]
    else:
        panels = [("gmacs", "GMACs")]
    fig = Figure(figsize=(6 * len(panels), 4.5))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels):
        _panel(ax, rows, xs, metric, label)
        ax.set_xlabel(X_AXES[x])
    axes[0, 0].legend(fontsize=7)
    return finish_figure(fig, title, out)


def read_csv(path: str | Path) -> list[SweepRow]:
    """Rows from a CSV written by :func:`write_csv` (to re-plot without re-measuring)."""
    try:
        with Path(path).open(newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
    except OSError as exc:
        raise TokenSparseError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    text = {"method", "spec", "knob"}
    return [SweepRow(**{k: (v if k in text else (float(v) if v != "" else None))
                        for k, v in rec.items()}) for rec in records]


def run_sweep(model: nn.Module, images: str | Path | None = None,
          wnids: str | Path | None = None, methods: Sequence[str] | None = None,
          points: int | None = None, **kwargs: Any) -> list[SweepRow]:
    """Sweep every method's knob on ``model`` and measure each point (see :func:`measure`)."""
    rows = sweep_specs(methods, points, model)
    return measure(rows, build_models(model, rows), images, wnids, **kwargs)

"""What tune reports: the measured rows (:class:`Candidate`), the result, its CSV and its plot."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from ..measure import MeasuredRow, measured
from ..utils import write_rows_csv
from ..viz import finish_figure


@dataclass
class Candidate(MeasuredRow):
    """One schedule: its method, spec and what was measured of it (:class:`~tokensparse.measure.MeasuredRow`).

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
    role: str = "path"
    predicted_speedup: float | None = measured()
    search_agreement: float | None = measured()
    search_kl: float | None = measured()
    select_agreement: float | None = measured()
    select_kl: float | None = measured()
    select_logp: float | None = measured()
    kl: float | None = measured()
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


def pareto(rows: list[Candidate], kind: str) -> list[Candidate]:
    """Rows no other row beats on both speed (measured speed-up, or GMACs) and held-out KL."""
    def better(a: Candidate, b: Candidate) -> bool:
        fa, fb = (a.speedup, b.speedup) if kind == "speedup" else (-a.gmacs, -b.gmacs)
        return fa >= fb and a.kl <= b.kl and (fa > fb or a.kl < b.kl)
    front = [r for r in rows if not any(better(o, r) for o in rows if o is not r)]
    for r in rows:
        r.pareto = r in front
    return front


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
    return finish_figure(fig, title, out)

"""Every method at the same GMACs on ViT-Tiny: top-1, agreement, mean KL and measured speed-up.

    python benchmarks/leaderboard.py [--levels 0.73 0.80] [--calibrated LEVEL=LABEL=SPEC ...]
                                     [--batch-size 64] [--runs 7] [--threads 2] [--out docs/leaderboard.png]

ViT-Tiny with the shared weights on the 500 shared images. Each method's one knob is set, by
bisection on GMACs alone (no image or label is looked at), to land within 2% of each level: the
schedule ``tune`` would write for a flat shape (``tokensparse.tune``'s knobs: ``r`` in every block
from the method's first for the merging methods, 3 / 6 / 9 for Top-K, EViT and PPT, Evo-ViT's
stages); where one ``r`` more or less in every block jumps past the 2% band, ``r + 1`` in the first
blocks and ``r`` in the rest. DiffRate also runs the authors' schedules learned on DeiT-Tiny (the same architecture;
``compression_rate.json``, "0.7" and "0.8" GFLOPs), transferred as they are, where they land
within 2% of a level. ``--calibrated`` adds specs learned on the even-position images
(``tokensparse calibrate --split even``: DiffRate's rates, DynamicViT's predictors). Then for every
configuration: top-1, agreement with the unreduced model and mean KL(unreduced || reduced) on the
250 odd-position images (which no calibration saw; the columns every row is compared on) and on
all 500, and the speed-up over the unreduced model (batch 64, median of interleaved runs in one
process). Writes the table and a plot of agreement (odd images) against speed-up.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from matplotlib.figure import Figure
from shared_args import add_shared_args, logits_of, shared_run  # this folder: run as a script

from tokensparse.api import patch, unpatch
from tokensparse.families import get_family
from tokensparse.measure import BASELINE, build_variants, fidelity, gmacs, timed_runs
from tokensparse.tune import TUNABLE

METHODS = ["tome", "mctf", "tofu", "pitome", "zerotprune", "diffrate", "topk", "evit", "ppt", "evovit"]
AUTHORS_DIFFRATE = {  # their DeiT-Tiny schedules (class token counted), by GFLOPs
    "0.7": ([197, 196, 194, 180, 150, 123, 98, 82, 68, 60, 52, 3], [197, 196, 192, 158, 133, 103, 88, 72, 64, 58, 49, 3]),
    "0.8": ([197, 197, 196, 186, 166, 147, 117, 103, 92, 80, 74, 3], [197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3]),
}
TOLERANCE = 0.02


def shape_of(knob) -> dict[int, float]:
    """The knob's flat shape: every block from its first for merging methods, 3 / 6 / 9 for the others."""
    shapes = dict(knob.shapes())
    for label in (f"from {knob.first} every 1 flat", "from 3 every 3 flat"):
        if label in shapes and (label.endswith("every 3 flat") or knob.method in
                                ("tome", "mctf", "tofu", "pitome", "zerotprune", "diffrate")):
            return shapes[label]
    return next(w for label, w in knob.shapes() if label.endswith("flat"))


def spec_at(model, name: str, level: float) -> tuple[str, float]:
    """The spec of ``name``'s flat shape whose GMACs land closest to ``level`` (bisection on the amount)."""
    family = get_family(model)
    P = family.num_prefix
    h, w = family.patch_grid()
    knob = TUNABLE[name](len(family.blocks), h * w, P)
    weights = shape_of(knob)

    def macs(amount: float) -> tuple[str, float]:
        spec = knob.spec(knob.fill(weights, amount, cut=False))
        patch(model, spec)
        g = gmacs(model)
        unpatch(model)
        return spec, g

    lo, hi = 0.0, float(h * w)
    best = macs(lo)
    for _ in range(30):
        mid = (lo + hi) / 2
        spec, g = macs(mid)
        if abs(g - level) < abs(best[1] - level):
            best = (spec, g)
        if g > level:
            lo = mid
        else:
            hi = mid
        if abs(g - level) <= 0.002 * level:
            break
    if abs(best[1] - level) > TOLERANCE * level and hasattr(knob, "first"):  # a flat r too coarse: r + 1 in the
        values = knob.fill(weights, lo, cut=False)                           # first k blocks, r in the rest
        for k in range(1, len(values) + 1):
            blocks = sorted(values)
            spec = knob.spec({b: values[b] + (i < k) for i, b in enumerate(blocks)})
            patch(model, spec)
            g = gmacs(model)
            unpatch(model)
            if abs(g - level) < abs(best[1] - level):
                best = (spec, g)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=float, nargs="+", default=[0.73, 0.80])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--calibrated", nargs="*", default=[], metavar="LEVEL=LABEL=SPEC",
                   help="a learned configuration to rank at LEVEL (e.g. 0.80=diffrate (calibrated)=diffrate:...)")
    p.add_argument("--out", type=Path, default=Path("docs/leaderboard.png"))
    add_shared_args(p)
    args = p.parse_args()
    model, images, labels, reference = shared_run(args)
    base_top1 = (reference.argmax(1) == labels).float().mean().item() * 100
    rows = []  # (level, label, spec, gmacs)
    for level in args.levels:
        for name in METHODS:
            spec, g = spec_at(model, name, level)
            rows.append((level, name, spec, g))
        for gf, (prune, merge) in AUTHORS_DIFFRATE.items():
            spec = f"diffrate:prune_kept={[k - 1 for k in prune]},merge_kept={[k - 1 for k in merge]}".replace(" ", "")
            patch(model, spec)
            g = gmacs(model)
            unpatch(model)
            if abs(g - level) <= TOLERANCE * level:
                rows.append((level, f"diffrate (authors' {gf})", spec, g))
        for item in args.calibrated:
            at, label, spec = item.split("=", 2)
            if float(at) == level:
                patch(model, spec)
                rows.append((level, label, spec, gmacs(model)))
                unpatch(model)
    results = {}
    odd = slice(1, None, 2)
    for level, label, spec, g in rows:
        patch(model, spec)
        logits = logits_of(model, images)
        unpatch(model)
        cells = []
        for part in (odd, slice(None)):
            agree, kl = fidelity(logits[part], reference[part])
            top1 = (logits[part].argmax(1) == labels[part]).float().mean().item() * 100
            cells.append((top1, agree, kl))
        results[spec] = cells
    variants = build_variants(model, list(dict.fromkeys(spec for _, _, spec, _ in rows)))
    times = timed_runs(variants, batch_size=args.batch_size, threads=args.threads, warmup=1, runs=args.runs)
    base = statistics.median(times[BASELINE])
    speed = {k: base / statistics.median(v) for k, v in times.items()}
    print(f"ViT-Tiny (shared weights), {len(images)} shared images; unreduced: {gmacs(model):.3f} GMACs, top-1 "
          f"{base_top1:.1f}; speed-up: batch {args.batch_size}, {args.threads} threads, median of {args.runs} "
          f"interleaved runs")
    odd_base = (reference[odd].argmax(1) == labels[odd]).float().mean().item() * 100
    print(f"unreduced top-1 on the 250 odd images: {odd_base:.1f}; one image is 0.4 points there, 0.2 on all 500")
    print(f"{'':5s}  {'':26s} {'':6s} | {'250 odd images':^22s} | {'all 500 images':^22s} |")
    print(f"{'level':>5s}  {'method':26s} {'GMACs':>6s} | {'top-1':>6s} {'agree':>6s} {'mean KL':>8s} | "
          f"{'top-1':>6s} {'agree':>6s} {'mean KL':>8s} | {'speed-up':>8s}  spec")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    markers = dict(zip(args.levels, "os^D"))
    for level, label, spec, g in rows:
        (t1, a1, k1), (t2, a2, k2) = results[spec]
        print(f"{level:5.2f}  {label:26s} {g:6.3f} | {t1:6.1f} {a1:6.1f} {k1:8.4f} | {t2:6.1f} {a2:6.1f} {k2:8.4f} | "
              f"{speed[spec]:7.2f}x  {spec}")
        agree = a1
        ax.scatter(speed[spec], agree, marker=markers[level], label=f"{label} @{level:.2f}")
        ax.annotate(label, (speed[spec], agree), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel(f"measured speed-up (batch {args.batch_size}, {args.threads} CPU threads)")
    ax.set_ylabel("agreement with the unreduced model, 250 odd images (%)")
    ax.set_title("ViT-Tiny, 500 shared images: circles ~0.73 GMACs, squares ~0.80")
    ax.grid(alpha=0.3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130, bbox_inches="tight")
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()

"""Command line interface: ``tokensparse bench | calibrate | train | viz | sweep``.

One ``add_<command>_parser`` / ``cmd_<command>`` pair per subcommand. Bad input (a
:class:`TokenSparseError` or a bad argument) prints one ``error: ...`` line on stderr and
exits with code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn, Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from .errors import TokenSparseError

BASELINE = "none"
DEFAULT_MODEL = "deit_small_patch16_224"


class UsageError(Exception):
    """A bad command line (unknown option, invalid value)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ----------------------------------------------------------------------------- helpers

def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --weights / --pretrained (shared by subcommands that build a model)."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"timm model name (default: {DEFAULT_MODEL})")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", metavar="FILE",
                        help="local .safetensors/.pth weights, loaded with strict=True")
    source.add_argument("--pretrained", action="store_true",
                        help="download timm's pretrained weights (needs a model hub)")


def add_images_args(parser: argparse.ArgumentParser) -> None:
    """--images / --wnids / --limit."""
    parser.add_argument("--images", metavar="DIR", type=Path,
                        help="ImageNet-style images: DIR/<wnid>/*.JPEG or DIR/<wnid>_*.JPEG")
    parser.add_argument("--wnids", metavar="FILE", type=Path,
                        help="class list, line i = class i (default: wnids.txt in DIR or "
                             "its parent)")
    parser.add_argument("--limit", metavar="N", type=positive_int,
                        help="use only the first N images (sorted by path)")


def find_wnids(images: Path, wnids: Path | None) -> Path | None:
    """The wnids file to use: the given one, else wnids.txt in ``images`` or its parent."""
    if wnids is not None:
        return wnids
    for candidate in (images / "wnids.txt", images.parent / "wnids.txt"):
        if candidate.is_file():
            return candidate
    return None


def load_model(args: argparse.Namespace) -> nn.Module:
    """The model named by --model, with --weights / --pretrained applied."""
    from .models import create_model
    return create_model(args.model, weights=args.weights, pretrained=args.pretrained)


def normalise_specs(specs: Sequence[str]) -> list[str]:
    """Canonical spec strings, the baseline ``none`` dropped; error on duplicates."""
    from .spec import format_spec, parse_spec
    out: list[str] = []
    for spec in specs:
        name, options = parse_spec(spec)
        label = format_spec(name, options)
        if label == BASELINE:
            continue
        if label in out:
            raise TokenSparseError(f"method {label!r} given twice")
        out.append(label)
    return out


def default_specs(model: nn.Module) -> list[str]:
    """Every registered method that supports ``model``, at its defaults (error for an unsupported family)."""
    import tokensparse
    from .patch import model_family
    model_family(model)  # names the supported families
    return [info.name for info in tokensparse.methods() if info.supports(model)]


def build_variants(base: nn.Module, specs: Sequence[str]) -> dict[str, nn.Module]:
    """``{"none": base, spec: patched deep copy of base, ...}`` (identical weights)."""
    import tokensparse
    variants = {BASELINE: base}
    for spec in specs:
        variants[spec] = tokensparse.patch(copy.deepcopy(base), spec)
    return variants


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON; TokenSparseError if the file cannot be written."""
    try:
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise TokenSparseError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


def fmt(value: float | None, digits: int) -> str:
    """A number for a table cell ('-' when missing)."""
    return "-" if value is None else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------- bench

@dataclass
class BenchRow:
    """One table / JSON row of ``tokensparse bench``."""
    method: str
    gmacs: float | None = None
    img_per_s: float | None = None
    speedup: float | None = None
    top1: float | None = None
    top5: float | None = None
    agreement: float | None = None


def add_bench_parser(subparsers: Any) -> None:
    """``tokensparse bench``: GMACs, throughput and accuracy of methods vs unreduced."""
    p = subparsers.add_parser(
        "bench", help="compare token reduction methods with the unreduced model",
        description="Measure GMACs (FLOPs/2, counted from a real forward pass), throughput "
                    "(interleaved, median of runs) and, with weights and --images, top-1/top-5 "
                    "and agreement with the unreduced model, for each --method.")
    add_model_args(p)
    p.add_argument("--method", action="append", metavar="SPEC",
                   help="method spec, e.g. tome:r=13 (repeatable; default: every method that "
                        "supports the model, at its defaults)")
    add_images_args(p)
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch intra-op threads while timing (default: torch's)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--runs", type=positive_int, default=10, metavar="N",
                   help="timed runs per model; the median is reported (default: 10)")
    p.add_argument("--warmup", type=int, default=2, metavar="N",
                   help="untimed warm-up runs per model (default: 2)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    p.set_defaults(func=cmd_bench)


def bench_accuracy_source(
        args: argparse.Namespace) -> tuple[tuple[Path, Path | None] | None, str]:
    """``((images, wnids), "")`` when accuracy can be measured, else ``(None, note)``.

    A given --images folder is checked (layout, class list) even when accuracy is skipped.
    """
    wnids = None
    if args.images is not None:
        from .measure import ImageNetFolder
        wnids = find_wnids(args.images, args.wnids)
        ImageNetFolder(args.images, wnids)  # fail fast on a bad folder or class list
    if args.weights is None and not args.pretrained:
        return None, ("note: accuracy columns need weights (--weights FILE or --pretrained); "
                      "measuring GMACs and throughput only")
    if args.images is None:
        return None, "note: accuracy columns need --images DIR; measuring GMACs and throughput only"
    return (args.images, wnids), ""


def run_bench(args: argparse.Namespace, variants: dict[str, nn.Module],
              accuracy_source: tuple[Path, Path | None] | None) -> list[BenchRow]:
    """Measure every variant; the first row is the unreduced model."""
    from .measure import compare_throughput, evaluate_many, gmacs
    from .measure._common import progress_bar

    rows = {name: BenchRow(name) for name in variants}
    with progress_bar("GMACs", len(variants)) as advance:
        for name, model in variants.items():
            rows[name].gmacs = gmacs(model)
            advance(1)
    total = (args.warmup + args.runs) * len(variants)
    with progress_bar("throughput", total) as advance:
        speed = compare_throughput(variants, batch_size=args.batch_size, threads=args.threads,
                                   device=args.device, dtype=args.dtype, warmup=args.warmup,
                                   runs=args.runs, progress=lambda done, _: advance(1))
    for name, ips in speed.items():
        rows[name].img_per_s = ips
        rows[name].speedup = ips / speed[BASELINE]
    if accuracy_source is not None:
        images, wnids = accuracy_source
        acc = evaluate_many(variants, images, wnids, reference_key=BASELINE,
                            batch_size=args.batch_size, device=args.device, limit=args.limit)
        for name, res in acc.items():
            rows[name].top1, rows[name].top5 = res["top1"], res["top5"]
            rows[name].agreement = res["agreement"]
    return list(rows.values())


def bench_table(args: argparse.Namespace, rows: Sequence[BenchRow], threads: int) -> Table:
    """The rich table printed by ``tokensparse bench``."""
    table = Table(
        title=f"{args.model} | batch {args.batch_size} | {threads} threads | {args.device} "
              f"{args.dtype} | median of {args.runs}",
        caption="GMACs = FLOPs/2 per image from a real forward pass; speed-up vs unreduced, "
                "timed interleaved in one process; agree = % same top-1 as unreduced")
    table.add_column("method", overflow="fold")
    for header in ("GMACs", "img/s", "speed-up", "top-1 %", "top-5 %", "agree %"):
        table.add_column(header, justify="right")
    for r in rows:
        table.add_row(r.method, fmt(r.gmacs, 3), fmt(r.img_per_s, 1),
                      "-" if r.speedup is None else f"{r.speedup:.2f}x",
                      fmt(r.top1, 1), fmt(r.top5, 1), fmt(r.agreement, 1))
    return table


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``tokensparse bench``."""
    console = Console()
    if args.warmup < 0:
        raise TokenSparseError(f"--warmup must be >= 0, got {args.warmup}")
    specs = normalise_specs(args.method) if args.method else None
    base = load_model(args)
    accuracy_source, note = bench_accuracy_source(args)
    variants = build_variants(base, specs if specs is not None else default_specs(base))
    if note:
        console.print(note)
    rows = run_bench(args, variants, accuracy_source)
    threads = args.threads or torch.get_num_threads()
    console.print(bench_table(args, rows, threads))
    if args.json is not None:
        write_json(args.json, [asdict(r) for r in rows])
        console.print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------- train / calibrate (DynamicViT)

def add_learning_args(parser: argparse.ArgumentParser) -> None:
    """--model/--weights, --method (a dynamicvit spec), --images/--wnids/--limit and --split."""
    add_model_args(parser)
    parser.add_argument("--method", default="dynamicvit", metavar="SPEC",
                        help="dynamicvit spec, e.g. dynamicvit:rho=0.7 (default: dynamicvit)")
    add_images_args(parser)
    parser.add_argument("--split", choices=("all", "even", "odd"), default="all",
                        help="use all images, or only the even / odd positions of the sorted list")


def add_train_parser(subparsers: Any) -> None:
    """``tokensparse train``: fine-tune a DynamicViT model (torchrun for several processes/nodes)."""
    p = subparsers.add_parser(
        "train", help="fine-tune DynamicViT's new parts and the backbone on an image folder",
        description="Fine-tune a timm ViT, ConvNeXt or Swin with DynamicViT (CE + ratio loss + "
                    "distillation from the unreduced model). Run under torchrun for "
                    "DistributedDataParallel (gloo on CPU, nccl on GPUs). Checkpoints go to "
                    "OUT/checkpoint.pt after every epoch (and every --checkpoint-every steps), the "
                    "learned parts to OUT/predictors.safetensors.")
    add_learning_args(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="checkpoint / predictors folder")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="FILE",
                   help="continue from OUT/checkpoint.pt (or FILE) exactly where it stopped")
    p.add_argument("--epochs", type=positive_int, default=30, metavar="N")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="per process (default: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="predictor learning rate (default: 1e-3)")
    p.add_argument("--backbone-lr-scale", type=float, default=0.01, help="backbone lr = lr x this (default: 0.01)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=5.0)
    p.add_argument("--ratio-weight", type=float, default=None,
                   help="ratio loss weight (default: 2.0 for ViTs, 10.0 for ConvNeXt / Swin)")
    p.add_argument("--distill-weight", type=float, default=0.5, help="KL to the teacher's logits (default: 0.5)")
    p.add_argument("--token-weight", type=float, default=0.5,
                   help="MSE to the teacher's final kept tokens / feature map (default: 0.5)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--checkpoint-every", type=positive_int, metavar="N", help="also checkpoint every N steps")
    p.add_argument("--max-steps", type=positive_int, metavar="N", help="stop after N optimiser steps in all")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="data loader workers (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch intra-op threads")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.set_defaults(func=cmd_train)


def _training_images(args: argparse.Namespace, model: nn.Module, training: bool) -> Any:
    """The --images folder with the model's transforms, --limit and --split applied."""
    from torch.utils.data import Subset

    from .train.finetune import image_dataset, split_dataset
    if args.images is None:
        raise TokenSparseError("--images DIR is required")
    data = image_dataset(args.images, model, find_wnids(args.images, args.wnids), training=training)
    if args.limit is not None:
        data = Subset(data, range(min(args.limit, len(data))))
    return split_dataset(data, args.split)


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``tokensparse train``."""
    from .train.finetune import TrainConfig, finetune
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workers < 0:
        raise TokenSparseError(f"--workers must be >= 0, got {args.workers}")
    model = load_model(args)
    data = _training_images(args, model, training=True)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, backbone_lr_scale=args.backbone_lr_scale,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, ratio_weight=args.ratio_weight,
        distill_weight=args.distill_weight, token_weight=args.token_weight, bf16=args.bf16, seed=args.seed,
        num_workers=args.workers, checkpoint_every=args.checkpoint_every, max_steps=args.max_steps)
    finetune(model, data, args.out, args.method, cfg, resume=args.resume, device=args.device)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        Console().print(f"trained on {len(data)} images; checkpoint {args.out / 'checkpoint.pt'}, "
                        f"predictors {args.out / 'predictors.safetensors'}")
    return 0


def add_calibrate_parser(subparsers: Any) -> None:
    """``tokensparse calibrate``: train only DynamicViT predictors, backbone frozen, no labels."""
    p = subparsers.add_parser(
        "calibrate", help="train DynamicViT's predictors (and fast paths) on unlabelled images, backbone frozen",
        description="Freeze the model and train only DynamicViT's new parts (prediction modules; "
                    "for ConvNeXt / Swin also the fast paths) by distillation from the unreduced "
                    "model (KL + token or feature-map MSE + ratio loss) on an image folder (labels "
                    "unused). Writes them as safetensors, for '--method dynamicvit:predictors=FILE'.")
    add_learning_args(p)
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="predictors .safetensors file")
    p.add_argument("--epochs", type=int, default=3, metavar="N", help="end-to-end distillation epochs (default: 3)")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--no-flip", action="store_true", help="do not add mirrored copies of the images")
    p.add_argument("--imitation-epochs", type=int, default=30, metavar="N",
                   help="warm-start epochs imitating the teacher's class-attention ranking (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch intra-op threads")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Run ``tokensparse calibrate``."""
    import time

    from .methods.dynamicvit import describe
    from .train.calibrate import CalibrateConfig, calibrate, method_plan
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args)
    method_plan(model, args.method)  # fail fast on a bad spec or model
    data = _training_images(args, model, training=False)
    cfg = CalibrateConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          flip=not args.no_flip, imitation_epochs=args.imitation_epochs, seed=args.seed)
    start = time.perf_counter()
    calibrate(model, data, args.method, cfg, out=args.out, device=args.device)
    d = describe(model)
    Console().print(f"calibrated {len(data)} images in {time.perf_counter() - start:.1f} s; locations "
                    f"{d['locations']}, tokens kept {d['tokens']}; wrote {args.out}")
    return 0


# ----------------------------------------------------------------------------- viz / sweep

def add_viz_parser(subparsers: Any) -> None:
    """``tokensparse viz``: token maps of one image, one row per method."""
    p = subparsers.add_parser(
        "viz", help="draw which patches each method keeps, drops or merges on one image",
        description="Run each --method on one image and draw, for every reduction location, the "
                    "image with dropped patches greyed out, merged patches tinted by group and "
                    "method masks (e.g. Evo-ViT's informative tokens) highlighted.")
    add_model_args(p)
    p.add_argument("--method", action="append", required=True, metavar="SPEC",
                   help="method spec, e.g. tome:r=13 (repeatable: one row each)")
    p.add_argument("--image", type=Path, required=True, metavar="FILE", help="input image")
    p.add_argument("--out", type=Path, default=Path("token_maps.png"), metavar="PNG",
                   help="output PNG (default: token_maps.png)")
    p.set_defaults(func=cmd_viz)


def cmd_viz(args: argparse.Namespace) -> int:
    """Run ``tokensparse viz``."""
    from .viz import token_maps
    specs = normalise_specs(args.method)
    if not specs:
        raise TokenSparseError("give at least one --method other than 'none'")
    if not args.image.is_file():
        raise TokenSparseError(f"image file not found: {str(args.image)!r}")
    from .methods import get_method
    from .spec import parse_spec
    for spec in specs:
        get_method(parse_spec(spec)[0])  # unknown method: fail before building the model
    model = load_model(args)
    token_maps(model, specs, args.image, out=args.out)
    Console().print(f"wrote {args.out}")
    return 0


def add_sweep_parser(subparsers: Any) -> None:
    """``tokensparse sweep``: accuracy vs speed-up over each method's main knob."""
    p = subparsers.add_parser(
        "sweep", help="sweep each method's main knob: accuracy against speed-up (CSV + PNG)",
        description="For each --method, measure every value of its main knob (see "
                    "tokensparse.sweep.GRIDS) with the unreduced model in the same run: GMACs, "
                    "speed-up, top-1/top-5 and agreement. Writes OUT/sweep.csv and OUT/sweep.png.")
    add_model_args(p)
    add_images_args(p)
    p.add_argument("--method", action="append", metavar="NAME",
                   help="method name, or NAME:key=value,... to fix other options (repeatable; default: "
                        "every training-free method with a grid that supports the model)")
    p.add_argument("--points", type=positive_int, metavar="N",
                   help="use only N values of each grid, spread evenly (default: all)")
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                   help="folder for sweep.csv and sweep.png (default: .)")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch intra-op threads while timing")
    p.add_argument("--runs", type=positive_int, default=5, metavar="N",
                   help="timed runs per model; the median is reported (default: 5)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed warm-up runs (default: 1)")
    p.add_argument("--x-axis", choices=("speedup", "gmacs"), default="speedup",
                   help="plot against measured speed-up, or against the GMACs reduction "
                        "(deterministic; for noisy machines) (default: speedup)")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run ``tokensparse sweep``."""
    from .sweep import build_models, measure, plot_sweep, sweep_specs, write_csv
    console = Console()
    if args.warmup < 0:
        raise TokenSparseError(f"--warmup must be >= 0, got {args.warmup}")
    if args.method:
        sweep_specs(args.method)  # unknown method: fail before building the model
    base = load_model(args)
    rows = sweep_specs(args.method, args.points, base)
    source, note = bench_accuracy_source(args)
    if note:
        console.print(note)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TokenSparseError(f"cannot create {str(args.out)!r}: {exc.strerror or exc}") from None
    console.print(f"sweeping {len(rows) - 1} variants + unreduced")
    images, wnids = source if source is not None else (None, None)
    measure(rows, build_models(base, rows), images, wnids, limit=args.limit,
            batch_size=args.batch_size, threads=args.threads, runs=args.runs, warmup=args.warmup)
    csv_path = write_csv(rows, args.out / "sweep.csv")
    n = f", {args.limit} images" if args.limit and images is not None else ""
    plot_sweep(rows, args.out / "sweep.png",
               title=f"{args.model} | batch {args.batch_size} | "
                     f"{args.threads or torch.get_num_threads()} threads{n}", x=args.x_axis)
    console.print(f"wrote {csv_path} and {args.out / 'sweep.png'}")
    return 0


# ----------------------------------------------------------------------------- main

def build_parser() -> ArgumentParser:
    """The ``tokensparse`` parser with one subparser per command."""
    from . import __version__
    parser = ArgumentParser(prog="tokensparse",
                            description="Token reduction for timm vision transformers.")
    parser.add_argument("--version", action="version", version=f"tokensparse {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_bench_parser(subparsers)
    add_train_parser(subparsers)
    add_calibrate_parser(subparsers)
    add_viz_parser(subparsers)
    add_sweep_parser(subparsers)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokensparse`` command; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except (UsageError, TokenSparseError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

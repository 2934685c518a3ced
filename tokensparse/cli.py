"""Command line interface: ``tokensparse bench | tune | calibrate | train | viz | sweep | export``.

One ``add_<command>_parser`` / ``cmd_<command>`` pair per subcommand. Bad input (a
:class:`TokenSparseError` or a bad argument) prints one ``error: ...`` line on stderr and
exits with code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import Dataset

from . import __version__
from .api import list_methods, patch
from .data import (
    ImageNetFolder,
    UnlabelledImages,
    check_class_count,
    drop_unreadable,
    image_dataset,
    worker_error_message,
)
from .errors import TokenSparseError
from .export import export_onnx
from .families import get_family
from .measure import (
    BASELINE,
    build_variants,
    is_classifier,
    measure_variants,
    measurement_device,
    random_predictors,
    wide_spread,
)
from .methods import get_method
from .methods.dynamicvit import describe
from .models import HF_PREFIX, create_model
from .spec import format_spec, parse_spec
from .sweep import build_models, measure, plot_sweep, sweep_specs, write_csv
from .train.calibrate import IMITATION_TARGETS, CalibrateConfig, calibrate_dynamicvit, check_output_file, method_plan
from .train.config import LearningConfig
from .train.diffrate import DiffRateConfig, calibrate_diffrate
from .train.finetune import CHECKPOINT, PREDICTORS, TrainConfig, finetune_dynamicvit
from .tune import SEARCH_IMAGES, TUNABLE, check_methods, check_target, plot_tune, tune, write_tune_csv
from .utils import atomic_write, check_writable_folder, resolve_device
from .viz import figure_path, token_maps

DEFAULT_MODEL = "deit_small_patch16_224"


class UsageError(Exception):
    """A bad command line (unknown option, invalid value)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ----------------------------------------------------------------------------- helpers

def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --weights / --pretrained (shared by subcommands that build a model)."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"timm model name, or hf:PATH for a transformers model saved with save_pretrained "
                             f"(a model hub id where a hub is reachable) (default: {DEFAULT_MODEL})")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", metavar="FILE",
                        help="local .safetensors/.pth weights, loaded with strict=True (timm models)")
    source.add_argument("--pretrained", action="store_true",
                        help="download timm's pretrained weights (needs a model hub)")


def command_parser(subparsers: Any, name: str, func: Any, help: str, description: str) -> argparse.ArgumentParser:
    """The subparser of command ``name`` run by ``func(args)``, with :func:`add_model_args` (every command builds a model)."""
    parser = subparsers.add_parser(name, help=help, description=description)
    add_model_args(parser)
    parser.set_defaults(func=func)
    return parser


def add_images_args(parser: argparse.ArgumentParser, unlabelled: bool = False, features: bool = False) -> None:
    """--images / --wnids / --limit (``unlabelled``: calibrate, which reads any images; ``features``:
    commands that measure a feature extractor's embeddings on any images)."""
    labelled = "ImageNet-style images: DIR/<wnid>/*.JPEG or DIR/<wnid>_*.JPEG"
    parser.add_argument("--images", metavar="DIR", type=Path,
                        help="any images under DIR (searched recursively; labels unused)" if unlabelled else
                        labelled + ("; for a model without a classifier, any images (embedding fidelity)"
                                    if features else ""))
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


def add_timing_args(parser: argparse.ArgumentParser, runs: int, warmup: int) -> None:
    """--batch-size, --threads, --runs, --warmup (the commands that time models)."""
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                        help="images per timed forward pass (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="torch intra-op threads while timing (default: torch's)")
    parser.add_argument("--runs", type=positive_int, default=runs, metavar="N",
                        help=f"timed runs per model; the median is reported (default: {runs})")
    parser.add_argument("--warmup", type=non_negative_int, default=warmup, metavar="N",
                        help=f"untimed warm-up runs per model (default: {warmup})")


def load_model(args: argparse.Namespace) -> nn.Module:
    """The model named by --model, with --weights / --pretrained applied."""
    return create_model(args.model, weights=args.weights, pretrained=args.pretrained)


def normalise_specs(specs: Sequence[str]) -> list[str]:
    """Canonical spec strings, the baseline ``none`` dropped; error on duplicates."""
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
    """Every registered training-free method that supports ``model``, at its defaults (those
    that need training, :func:`needs_trained_parts`, are left out: at their defaults their
    learned parts are random). Error for an unsupported family, or when no such method supports it."""
    family = get_family(model)  # names the supported families
    specs = [info.name for info in list_methods() if info.supports(model) and not info.needs_training]
    if not specs:
        name = next(iter(needs_trained_parts(model)), "NAME")
        raise TokenSparseError(
            f"no training-free method supports {family.name} models; give --method {name}:predictors=FILE "
            f"(trained by 'tokensparse calibrate'), or --method {name} to time it with random predictors")
    return specs


def needs_trained_parts(model: nn.Module) -> list[str]:
    """The methods that support ``model`` but need training (DynamicViT): left out of :func:`default_specs`."""
    return [info.name for info in list_methods() if info.supports(model) and info.needs_training]


OVERWRITE_HELP = "replace output files that already exist (without it, an existing output file is an error)"


def add_overwrite_arg(parser: argparse.ArgumentParser, help: str = OVERWRITE_HELP) -> None:
    """--overwrite: the one rule for every command's output files (nothing the user had is replaced
    unless asked)."""
    parser.add_argument("--overwrite", action="store_true", help=help)


def refuse_existing(path: Path, what: str, overwrite: bool) -> None:
    """An error naming ``path`` when it exists and ``overwrite`` is not given (the CLI's one rule)."""
    if path.exists() and not overwrite:
        raise TokenSparseError(f"{what} {str(path)!r} already exists; pass --overwrite to replace it, or give "
                               f"another name")


def check_output_path(path: Path, what: str, overwrite: bool = False) -> Path:
    """Before any expensive work: ``path`` is not a folder, its folder can be written (created if
    missing), and it does not exist unless ``overwrite``; TokenSparseError naming the path otherwise."""
    if path.is_dir():
        raise TokenSparseError(f"cannot write {what} {str(path)!r}: it is a folder; give a file name")
    refuse_existing(path, what, overwrite)
    check_writable_folder(path.parent, f"folder for the {what}")
    return path


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON (atomically); TokenSparseError if the file cannot be written."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"), text=True)


def fmt(value: float | None, digits: int) -> str:
    """A number for a table cell ('-' when missing)."""
    return "-" if value is None else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------- bench

def add_bench_parser(subparsers: Any) -> None:
    """``tokensparse bench``: GMACs, throughput and accuracy of methods vs unreduced."""
    p = command_parser(
        subparsers, "bench", cmd_bench, help="compare token reduction methods with the unreduced model",
        description="Measure GMACs (FLOPs/2, counted from a real forward pass), throughput "
                    "(interleaved, median of runs) and, with weights and --images, top-1/top-5 "
                    "and agreement with the unreduced model, for each --method.")
    p.add_argument("--method", action="append", metavar="SPEC",
                   help="method spec, e.g. tome:r=13 (repeatable; default: every method that "
                        "supports the model, at its defaults)")
    add_images_args(p, features=True)
    add_timing_args(p, runs=10, warmup=2)
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast to bfloat16 (default: %(default)s)")
    runtime = p.add_mutually_exclusive_group()
    runtime.add_argument("--compile", action="store_true",
                         help="time torch.compile(fullgraph=True) of every model (compile time reported apart)")
    runtime.add_argument("--runtime", choices=("pytorch", "onnxruntime"), default="pytorch",
                         help="onnxruntime: time every model exported to ONNX (fixed batch) in onnxruntime; export "
                              "time reported apart; needs tokensparse[export] (default: pytorch)")
    p.add_argument("--compile-backend", metavar="NAME",
                   help="torch.compile backend with --compile (default: inductor)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    add_overwrite_arg(p)


def check_compile_backend(args: argparse.Namespace) -> None:
    """--compile-backend needs --compile, and must name a backend torch.compile knows."""
    if args.compile_backend is None:
        return
    if not args.compile:
        raise TokenSparseError("--compile-backend applies to --compile only; add --compile (or drop it)")
    backends = torch._dynamo.list_backends(exclude_tags=())
    if args.compile_backend not in backends:
        raise TokenSparseError(f"unknown --compile-backend {args.compile_backend!r}; torch.compile's backends: "
                               f"{', '.join(backends)}")


def bench_accuracy_source(
        args: argparse.Namespace, model: nn.Module | None = None) -> tuple[tuple[Path, Path | None] | None, str]:
    """``((images, wnids), "")`` when accuracy (or, for a feature extractor, embedding fidelity) can
    be measured, else ``(None, note)``.

    A given --images folder is checked (layout, class list; any images for a feature extractor)
    even when accuracy is skipped.
    """
    wnids = None
    if args.images is not None:
        if model is not None and not is_classifier(model):
            UnlabelledImages(args.images)  # a feature extractor needs no labels
        else:
            wnids = find_wnids(args.images, args.wnids)
            ImageNetFolder(args.images, wnids)  # fail fast on a bad folder or class list
    if args.weights is None and not args.pretrained and not args.model.startswith(HF_PREFIX):
        return None, ("note: accuracy columns need weights (--weights FILE or --pretrained); "
                      "measuring GMACs and throughput only")
    if args.images is None:
        return None, "note: accuracy columns need --images DIR; measuring GMACs and throughput only"
    return (args.images, wnids), ""


def run_bench(args: argparse.Namespace, variants: dict[str, nn.Module],
              accuracy_source: tuple[Path, Path | None] | None) -> list[dict[str, Any]]:
    """One row per variant, the unreduced model first: ``{"method": spec, **metrics,
    "random_predictors": bool}`` with the metrics :data:`tokensparse.measure.compare.METRICS`
    (the table and JSON rows); ``random_predictors``: :func:`~tokensparse.measure.random_predictors`."""
    images, wnids = accuracy_source if accuracy_source is not None else (None, None)
    results = measure_variants(variants, BASELINE, images, wnids, limit=args.limit,
                               batch_size=args.batch_size, threads=args.threads, device=args.device,
                               dtype=args.dtype, runs=args.runs, warmup=args.warmup, runtime=bench_runtime(args),
                               compile_backend=args.compile_backend or "inductor")
    return [{"method": name, **metrics, "random_predictors": random_predictors(name)}
            for name, metrics in results.items()]


def bench_runtime(args: argparse.Namespace) -> str:
    """The :data:`~tokensparse.measure.runtimes.RUNTIMES` entry ``bench``'s options name."""
    return "compile" if args.compile else "onnxruntime" if args.runtime == "onnxruntime" else "eager"


def speedup_text(row: dict[str, Any]) -> tuple[str, str]:
    """The speed-up cell (``1.60x``) and its range cell (``1.55-1.66``) of a bench row."""
    if row["speedup"] is None:
        return "-", "-"
    low, high = row.get("speedup_low"), row.get("speedup_high")
    return f"{row['speedup']:.2f}x", "-" if low is None or high is None else f"{low:.2f}-{high:.2f}"


def bench_table(args: argparse.Namespace, rows: Sequence[dict[str, Any]], threads: int) -> Table:
    """The rich table printed by ``tokensparse bench``."""
    table = Table(
        title=f"{args.model} | batch {args.batch_size} | {threads} threads | {args.device} "
              f"{args.dtype} | {bench_runtime(args)} | median of {args.runs}",
        caption="GMACs = FLOPs/2 per image from a real forward pass; ms/batch = median latency of one batch; "
                "speed-up vs unreduced, "
                "timed interleaved in one process (median; range: lowest-highest of the runs, each "
                "against the unreduced model timed in the same run); agree = % same top-1 as unreduced"
                + ("; eager: the same PyTorch models uncompiled, timed in the same runs" if bench_runtime(args) != "eager"
                   else ""))
    table.add_column("method", overflow="fold")
    vs_eager = bench_runtime(args) != "eager"
    features = any(r.get("cosine") is not None for r in rows)
    headers = ["GMACs", "img/s", "ms/batch", "speed-up", "range"]
    if vs_eager:
        headers += ["eager ms/batch", "eager speed-up"]
    quality = ["cosine", "NN agree %"] if features else ["top-1 %", "top-5 %", "agree %"]
    for header in (*headers, *quality):
        table.add_column(header, justify="right")
    if features:
        table.caption += ("; a model without a classifier: cosine = mean cosine similarity of each image's "
                          "embedding to the unreduced one, NN agree = % of images whose nearest neighbour "
                          "among the images stays the same")
    for r in rows:
        label = r["method"] + (" (random predictors)" if r.get("random_predictors") else "")
        eager_x = r.get("eager_speedup")
        eager = [fmt(r.get("eager_latency_ms"), 1), "-" if eager_x is None else f"{eager_x:.2f}x"] if vs_eager else []
        cells = [fmt(r.get("cosine"), 4), fmt(r["agreement"], 1)] if features else \
            [fmt(r["top1"], 1), fmt(r["top5"], 1), fmt(r["agreement"], 1)]
        table.add_row(label, fmt(r["gmacs"], 3), fmt(r["img_per_s"], 1), fmt(r.get("latency_ms"), 1), *speedup_text(r),
                      *eager, *cells)
    return table


def spread_warning(rows: Sequence[dict[str, Any]]) -> str:
    """A warning naming the rows whose speed-up range is wide (:func:`~tokensparse.measure.wide_spread`), or ''."""
    wide = [r for r in rows if wide_spread(r)]
    if not wide:
        return ""
    listed = ", ".join(f"{r['method']} {r['speedup_low']:.2f}-{r['speedup_high']:.2f}x" for r in wide)
    return (f"warning: speed-ups varied by more than 10% between runs ({listed}): the machine was busy or "
            f"changed speed while timing; close other work and run again, and compare runs before trusting them")


def table_console() -> Console:
    """A console for wide tables: the terminal's width (or ``COLUMNS``), else 120 columns when the output is
    not a terminal (a file, a pipe: rows are not folded to a default 80)."""
    return Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=120)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``tokensparse bench``."""
    console = table_console()
    specs = normalise_specs(args.method) if args.method else None
    measurement_device(args.device)  # a bad or unusable device fails before anything is loaded
    check_compile_backend(args)
    if args.json is not None:
        check_output_path(args.json, "JSON file", args.overwrite)
    base = load_model(args)
    accuracy_source, note = bench_accuracy_source(args, base)
    notes = [note] if note else []
    if specs is None:
        specs = default_specs(base)
        notes += [f"note: {name} left out: it needs trained predictors; give --method {name}:predictors=FILE "
                  f"(from 'tokensparse calibrate'), or --method {name} to time it with random predictors"
                  for name in needs_trained_parts(base)]
    variants = build_variants(base, specs)
    for text in notes:
        console.print(text)
    rows = run_bench(args, variants, accuracy_source)
    threads = args.threads or torch.get_num_threads()
    console.print(bench_table(args, rows, threads))
    if bench_runtime(args) != "eager":
        what = "compile" if args.compile else "export + check"
        console.print(f"{what} seconds (not timed): " + ", ".join(f"{r['method']} {r['compile_s']:.1f}" for r in rows),
                      markup=False)
    warning = spread_warning(rows)
    if warning:
        console.print(warning, markup=False)
    if args.json is not None:
        write_json(args.json, rows)
        console.print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------- train / calibrate (DynamicViT)

#: LearningConfig field -> command-line option destination, for the options train and calibrate share
LEARNING_OPTIONS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay",
                    "warmup_epochs": "warmup_epochs", "ratio_weight": "ratio_weight",
                    "distill_weight": "distill_weight", "token_weight": "token_weight", "seed": "seed",
                    "num_workers": "workers"}


def add_learning_args(parser: argparse.ArgumentParser, config: type[LearningConfig], device: str | None,
                      device_help: str, method_help: str = "dynamicvit spec, e.g. dynamicvit:rho=0.7 (default: dynamicvit)",
                      other: type[LearningConfig] | None = None) -> None:
    """What train and calibrate share: --method (a dynamicvit spec),
    --images/--wnids/--limit, --split, the :data:`LEARNING_OPTIONS` (defaults from ``config``),
    --threads and --device. With ``other`` (calibrate's ``diffrate``), the options whose defaults
    differ default to None, resolved per method by :func:`learning_config`, and their help shows both."""
    parser.add_argument("--method", default="dynamicvit", metavar="SPEC", help=method_help)
    add_images_args(parser, unlabelled=config is CalibrateConfig)
    parser.add_argument("--split", choices=("all", "even", "odd"), default="all",
                        help="use all images, or only the even / odd positions of the sorted list")
    def default(name: str) -> tuple[Any, str]:
        """The option's default and its help note: one default, or None and one per method."""
        mine = getattr(config, name)
        if other is None or getattr(other, name) == mine:
            return mine, "(default: %(default)s)"
        return None, f"(default: dynamicvit {mine}, diffrate {getattr(other, name)})"

    d, note = default("epochs")
    parser.add_argument("--epochs", type=non_negative_int, default=d, metavar="N",
                        help=f"training epochs; for calibrate, the end-to-end distillation epochs after "
                             f"--imitation-epochs (dynamicvit), the search's epochs (diffrate) {note}")
    d, note = default("batch_size")
    parser.add_argument("--batch-size", type=positive_int, default=d, metavar="N", help=f"per process {note}")
    d, note = default("lr")
    parser.add_argument("--lr", type=float, default=d,
                        help=f"learning rate of DynamicViT's new parts (diffrate: of the rates) {note}")
    d, note = default("weight_decay")
    parser.add_argument("--weight-decay", type=float, default=d, help=f"AdamW weight decay {note}")
    d, note = default("warmup_epochs")
    parser.add_argument("--warmup-epochs", type=float, default=d,
                        help=f"epochs of linear learning-rate warm-up before the cosine decay {note}")
    parser.add_argument("--ratio-weight", type=float, default=config.ratio_weight,
                        help="ratio loss weight (default: 2.0 for ViTs, 10.0 for ConvNeXt / Swin)")
    parser.add_argument("--distill-weight", type=float, default=config.distill_weight,
                        help="KL to the teacher's logits (default: %(default)s)")
    parser.add_argument("--token-weight", type=float, default=config.token_weight,
                        help="MSE to the teacher's final kept tokens / feature map (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=config.seed,
                        help="seed of the random views, masks and data order (default: %(default)s)")
    parser.add_argument("--workers", type=non_negative_int, default=config.num_workers, metavar="N",
                        help="data loader workers (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, metavar="N", help="torch intra-op threads")
    parser.add_argument("--device", default=device, help=device_help)


def learning_setup(args: argparse.Namespace) -> nn.Module:
    """Apply --threads, check --device, load the model and check that --method can be trained on
    it (:func:`~tokensparse.train.calibrate.method_plan`: the start of train and calibrate)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is not None:
        resolve_device(args.device)  # e.g. --device cuda without a GPU: an error before anything is loaded
    name = parse_spec(args.method)[0]
    learned = ("dynamicvit", "diffrate") if args.command == "calibrate" else ("dynamicvit",)
    if name not in learned:
        raise TokenSparseError(f"{args.command} supports the learned method{'s' * (len(learned) > 1)} "
                               f"{', '.join(map(repr, learned))}, got {name!r}")
    model = load_model(args)
    if name == "dynamicvit":
        method_plan(model, args.method)  # a family or option dynamicvit does not support: the same error for both
    return model


def learning_config(config: type[LearningConfig], args: argparse.Namespace, **options: Any) -> Any:
    """``config`` from the shared :data:`LEARNING_OPTIONS` of ``args`` (an option left at None: ``config``'s
    default) and the command's own ``options``."""
    given = {field: getattr(args, dest) for field, dest in LEARNING_OPTIONS.items()}
    return config(**{k: v for k, v in given.items() if v is not None or k == "ratio_weight"}, **options)


def training_images(args: argparse.Namespace, model: nn.Module, training: bool,
                    labels: bool) -> tuple[Dataset, list[Path]]:
    """The --images folder with the model's transforms, --limit and --split applied, and the
    unreadable image files left out (:func:`~tokensparse.data.drop_unreadable`).

    ``labels``: the folder must be labelled (ImageNet layouts: ``train``'s cross-entropy);
    otherwise every image under the folder is read, any name, flat or nested, and a class
    list is not needed (``calibrate``).
    """
    if args.images is None:
        raise TokenSparseError("--images DIR is required")
    wnids = find_wnids(args.images, args.wnids) if labels else None
    data = image_dataset(args.images, model, wnids, training=training, split=args.split, limit=args.limit,
                         labelled=labels)
    if labels:
        check_class_count(data, model, args.model)  # more classes than the head has outputs
    return drop_unreadable(data)


def skipped_note(skipped: Sequence[Path]) -> str:
    """The summary's note on unreadable images ('' when none)."""
    if not skipped:
        return ""
    return f"; skipped {len(skipped)} unreadable image{'s' * (len(skipped) > 1)} (e.g. {str(skipped[0])!r})"


def add_train_parser(subparsers: Any) -> None:
    """``tokensparse train``: fine-tune a DynamicViT model (torchrun for several processes/nodes)."""
    p = command_parser(
        subparsers, "train", cmd_train, help="fine-tune DynamicViT's new parts and the backbone on an image folder",
        description="Fine-tune a timm ViT, ConvNeXt or Swin, or a transformers ViT, DeiT, DINOv2, CLIP or SigLIP "
                    "model (--model hf:PATH), with DynamicViT (CE + ratio loss + "
                    "distillation from the unreduced model). Run under torchrun for "
                    "DistributedDataParallel (gloo on CPU, nccl on GPUs). Checkpoints go to "
                    "OUT/checkpoint.pt after every epoch (and every --checkpoint-every steps), the "
                    "learned parts to OUT/predictors.safetensors.")
    add_learning_args(p, TrainConfig, device=None, device_help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="checkpoint / predictors folder")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="FILE",
                   help="continue from OUT/checkpoint.pt (or FILE) exactly where it stopped (a new --epochs, "
                        "--lr, --warmup-epochs, --weight-decay or --backbone-lr-scale rebuilds the "
                        "learning-rate schedule for them)")
    add_overwrite_arg(p, "start over even if OUT already holds a checkpoint, replacing it (without --resume "
                         "or --overwrite, an existing checkpoint is an error)")
    p.add_argument("--backbone-lr-scale", type=float, default=TrainConfig.backbone_lr_scale,
                   help="backbone lr = lr x this (default: %(default)s)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--checkpoint-every", type=positive_int, metavar="N", help="also checkpoint every N steps")
    p.add_argument("--max-steps", type=positive_int, metavar="N", help="stop after N optimiser steps in all")


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``tokensparse train``."""
    cfg = learning_config(TrainConfig, args, backbone_lr_scale=args.backbone_lr_scale, bf16=args.bf16,
                          checkpoint_every=args.checkpoint_every, max_steps=args.max_steps)
    cfg.validate()  # bad options fail before the model is loaded
    model = learning_setup(args)
    data, skipped = training_images(args, model, training=True, labels=True)
    finetune_dynamicvit(model, data, args.out, args.method, cfg, resume=args.resume, device=args.device,
                        overwrite=args.overwrite)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        Console().print(f"trained on {len(data)} images{skipped_note(skipped)}; checkpoint {args.out / CHECKPOINT}, "
                        f"predictors {args.out / PREDICTORS}", markup=False)
    return 0


def add_calibrate_parser(subparsers: Any) -> None:
    """``tokensparse calibrate``: train only DynamicViT predictors, backbone frozen, no labels."""
    p = command_parser(
        subparsers, "calibrate", cmd_calibrate, help="train DynamicViT's predictors (and fast paths) on unlabelled images, backbone frozen",
        description="Freeze the model and train only DynamicViT's new parts (prediction modules; "
                    "for ConvNeXt / Swin also the fast paths) by distillation from the unreduced "
                    "model (KL + token or feature-map MSE + ratio loss) on an image folder (labels "
                    "unused: without a class list, every image under DIR is used, any names). Writes "
                    "them as safetensors, for '--method dynamicvit:predictors=FILE'.")
    add_learning_args(p, CalibrateConfig, device="cpu", device_help="torch device (default: cpu)",
                      method_help="dynamicvit spec, e.g. dynamicvit:rho=0.7 (default: dynamicvit), or diffrate "
                                  "(with --gmacs: learn its per-block prune and merge counts)",
                      other=DiffRateConfig)
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="dynamicvit: the predictors .safetensors file (required); diffrate: a text file for the spec")
    p.add_argument("--gmacs", type=float, metavar="G", help="diffrate: the GMACs per image to reach (required)")
    p.add_argument("--granularity", type=positive_int, default=DiffRateConfig.granularity, metavar="N",
                   help="diffrate: the gap between candidate token counts (default: %(default)s)")
    p.add_argument("--gmacs-weight", type=float, default=DiffRateConfig.gmacs_weight, metavar="W",
                   help="diffrate: weight of ((GMACs - target) / target)^2 in the loss (default: %(default)s)")
    add_overwrite_arg(p)
    p.add_argument("--no-flip", action="store_true", help="do not add mirrored copies of the images")
    p.add_argument("--views", type=non_negative_int, default=CalibrateConfig.views, metavar="N",
                   help="random views per image: crop, flip, brightness / contrast (default: %(default)s)")
    p.add_argument("--holdout", type=float, default=CalibrateConfig.holdout, metavar="S",
                   help="share of the images held out to keep the epoch closest to the unreduced model "
                        "(0: the last epoch; default: %(default)s)")
    p.add_argument("--imitation-epochs", type=non_negative_int, default=CalibrateConfig.imitation_epochs,
                   metavar="N", help="warm-start epochs teaching predictors the teacher's token ranking "
                                     "(0: off; default: %(default)s)")
    p.add_argument("--imitation-target", choices=IMITATION_TARGETS, default=CalibrateConfig.imitation_target,
                   help="the ranking the warm start teaches: rollout (how much each token reaches the class "
                        "token at the end) or attention (the block's class attention) (default: %(default)s)")


def cmd_calibrate_diffrate(args: argparse.Namespace) -> int:
    """``tokensparse calibrate --method diffrate --gmacs G``: learn the counts, print (and write) the spec."""
    if args.gmacs is None:
        raise TokenSparseError("calibrate --method diffrate needs --gmacs G, the GMACs per image to reach")
    if parse_spec(args.method)[1]:
        raise TokenSparseError(f"calibrate learns diffrate's counts: give --method diffrate without options, "
                               f"got {args.method!r}")
    cfg = learning_config(DiffRateConfig, args, granularity=args.granularity, gmacs_weight=args.gmacs_weight,
                          flip=not args.no_flip)
    cfg.validate()
    if args.out is not None:
        check_output_file(args.out, "the spec", "diffrate.spec")
        refuse_existing(args.out, "spec file", args.overwrite)
    model = learning_setup(args)
    data, skipped = training_images(args, model, training=False, labels=False)
    start = time.perf_counter()
    result = calibrate_diffrate(model, data, args.gmacs, cfg, device=args.device)
    Console().print(f"calibrated {len(data)} images{skipped_note(skipped)} in {time.perf_counter() - start:.1f} s; "
                    f"{result.gmacs:.3f} GMACs measured (target {result.target:g})", markup=False)
    if args.out is not None:
        atomic_write(args.out, lambda f: f.write(result.spec + "\n"), text=True)
        Console().print(f"wrote {args.out}", markup=False)
    print(result.spec)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Run ``tokensparse calibrate``."""
    if parse_spec(args.method)[0] == "diffrate":
        return cmd_calibrate_diffrate(args)
    if args.out is None:
        raise TokenSparseError("calibrate --method dynamicvit needs --out FILE, the predictors .safetensors file")
    cfg = learning_config(CalibrateConfig, args, flip=not args.no_flip, views=args.views, holdout=args.holdout,
                          imitation_epochs=args.imitation_epochs, imitation_target=args.imitation_target)
    cfg.validate()  # bad options and an unwritable --out fail before the model is loaded
    check_output_file(args.out)
    refuse_existing(args.out, "predictors file", args.overwrite)
    model = learning_setup(args)
    method_plan(model, args.method)  # fail fast on a bad spec or model
    data, skipped = training_images(args, model, training=False, labels=False)
    start = time.perf_counter()
    calibrate_dynamicvit(model, data, args.method, cfg, out=args.out, device=args.device)
    d = describe(model)
    Console().print(f"calibrated {len(data)} images{skipped_note(skipped)} in {time.perf_counter() - start:.1f} s; "
                    f"locations {d['locations']}, tokens kept {d['tokens']}; wrote {args.out}", markup=False)
    return 0


# ----------------------------------------------------------------------------- viz / sweep

def add_viz_parser(subparsers: Any) -> None:
    """``tokensparse viz``: token maps of one image, one row per method."""
    p = command_parser(
        subparsers, "viz", cmd_viz, help="draw which patches each method keeps, drops or merges on one image",
        description="Run each --method on one image and draw, for every reduction location, the "
                    "image with dropped patches greyed out, merged patches tinted by group and "
                    "method masks (e.g. Evo-ViT's informative tokens) highlighted.")
    p.add_argument("--method", action="append", required=True, metavar="SPEC",
                   help="method spec, e.g. tome:r=13 (repeatable: one row each)")
    p.add_argument("--image", type=Path, required=True, metavar="FILE", help="input image")
    p.add_argument("--out", type=Path, default=Path("token_maps.png"), metavar="FILE",
                   help="output image: .png, .jpg, .pdf, .svg or another format matplotlib writes "
                        "(.png added when there is no suffix; default: token_maps.png)")
    add_overwrite_arg(p)


def cmd_viz(args: argparse.Namespace) -> int:
    """Run ``tokensparse viz``."""
    specs = normalise_specs(args.method)
    if not specs:
        raise TokenSparseError("give at least one --method other than 'none'")
    if not args.image.is_file():
        raise TokenSparseError(f"image file not found: {str(args.image)!r}")
    for spec in specs:
        get_method(parse_spec(spec)[0])  # unknown method: fail before building the model
    out = check_output_path(figure_path(args.out), "figure", args.overwrite)  # before any model runs
    model = load_model(args)
    token_maps(model, specs, args.image, out=out)
    Console().print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- export

def add_export_parser(subparsers: Any) -> None:
    """``tokensparse export``: the reduced model as an ONNX file, checked with onnxruntime."""
    p = command_parser(
        subparsers, "export", cmd_export, help="export a reduced model to ONNX (checked with onnxruntime)",
        description="Patch the model with --method (or 'none'), export it with torch.onnx (dynamo), run the "
                    "file with onnxruntime on a random batch and fail if it differs from PyTorch by more than "
                    "--atol. Prints the file's inputs and outputs. Needs tokensparse[export].")
    p.add_argument("--method", required=True, metavar="SPEC", help="method spec, e.g. tome:r=13, or none")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.onnx", help="ONNX file to write")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=positive_int, metavar="N", help="a fixed batch of N images")
    batch.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch dimension (the default)")
    p.add_argument("--image-size", type=positive_int, nargs=2, metavar=("H", "W"),
                   help="input height and width (default: the model's)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest difference allowed (default: 1e-4)")
    add_overwrite_arg(p)


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``tokensparse export``."""
    name, options = parse_spec(args.method)
    label = format_spec(name, options)
    if label != BASELINE:
        get_method(name)  # unknown method: fail before building the model
    if not args.atol > 0:
        raise TokenSparseError(f"--atol must be > 0, got {args.atol!r}")
    out = check_output_path(args.out, "ONNX file", args.overwrite)
    model = load_model(args)
    if label != BASELINE:
        patch(model, label)
    dynamic = args.batch_size is None
    report = export_onnx(model, out, batch_size=2 if dynamic else args.batch_size, dynamic_batch=dynamic,
                         image_size=args.image_size, atol=args.atol)
    console = Console()
    untrained = random_predictors(label)
    table = Table(title=f"{out} | {args.model} | {label}" + (" (random predictors)" if untrained else ""))
    for header in ("", "name", "shape"):
        table.add_column(header)
    for kind, items in (("input", report.inputs), ("output", report.outputs)):
        for item_name, shape in items:
            table.add_row(kind, item_name, "(" + ", ".join(map(str, shape)) + ")")
    console.print(table)
    console.print(f"onnxruntime matches PyTorch on a batch of {report.check_batch}: largest difference "
                  f"{report.max_difference:.2g} (allowed {args.atol:g})")
    if untrained:
        console.print(f"note: {name} without predictors=FILE has random predictors: the exported model keeps "
                      f"tokens at random (its speed is the trained method's); calibrate them first "
                      f"('tokensparse calibrate') and export with --method {name}:predictors=FILE", markup=False)
    console.print(f"wrote {out}")
    return 0


def add_sweep_parser(subparsers: Any) -> None:
    """``tokensparse sweep``: accuracy vs speed-up over each method's main knob."""
    p = command_parser(
        subparsers, "sweep", cmd_sweep, help="sweep each method's main knob: accuracy against speed-up (CSV + PNG)",
        description="For each --method, measure every value of its main knob (see "
                    "tokensparse.sweep.GRIDS) with the unreduced model in the same run: GMACs, "
                    "speed-up, top-1/top-5 and agreement. Writes OUT/sweep.csv and OUT/sweep.png.")
    add_images_args(p, features=True)
    p.add_argument("--method", action="append", metavar="NAME",
                   help="method name, or NAME:key=value,... to fix other options (repeatable; default: "
                        "every training-free method with a grid that supports the model)")
    p.add_argument("--points", type=positive_int, metavar="N",
                   help="use only N values of each grid, spread evenly (default: all)")
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                   help="folder for sweep.csv and sweep.png (default: .)")
    add_overwrite_arg(p)
    add_timing_args(p, runs=5, warmup=1)
    p.add_argument("--x-axis", choices=("speedup", "gmacs"), default="speedup",
                   help="plot against measured speed-up, or against the GMACs reduction "
                        "(deterministic; for noisy machines) (default: speedup)")


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run ``tokensparse sweep``."""
    console = Console()
    if args.method:
        sweep_specs(args.method)  # unknown method: fail before building the model
    check_writable_folder(args.out, "output folder")  # before anything is measured
    for name in ("sweep.csv", "sweep.png"):
        check_output_path(args.out / name, "sweep output", args.overwrite)
    base = load_model(args)
    rows = sweep_specs(args.method, args.points, base)
    source, note = bench_accuracy_source(args, base)
    if note:
        console.print(note)
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


# ----------------------------------------------------------------------------- tune

def speedup_target(text: str) -> float | str:
    """argparse type of --speedup: a number, or a method spec whose measured speed-up is the target."""
    try:
        return float(text)
    except ValueError:
        return text


def add_tune_parser(subparsers: Any) -> None:
    """``tokensparse tune``: the most faithful schedule for a speed-up (or GMACs) target."""
    p = command_parser(
        subparsers, "tune", cmd_tune, help="find the most faithful reduction for a speed-up (or GMACs) target",
        description="Search per-location schedules of every training-free method for the one closest to the "
                    "unreduced model (agreement, mean KL of the logits) at --speedup times its speed, measured on "
                    "this machine at --batch-size, --threads, --device and --dtype (or at most --gmacs GMACs). "
                    "Images need no labels: even positions are searched on, odd ones held out. Writes OUT/tune.csv "
                    "and OUT/tune.png and prints the chosen spec on the last line.")
    p.add_argument("--images", metavar="DIR", type=Path, required=True,
                   help="any folder of images (searched recursively; labels not needed)")
    p.add_argument("--wnids", metavar="FILE", type=Path,
                   help="class list (line i = class i) for ImageNet-style names: adds held-out top-1")
    p.add_argument("--limit", metavar="N", type=positive_int, help="use only the first N images (sorted by path)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--speedup", type=speedup_target, metavar="X|SPEC",
                        help="target speed-up over the unreduced model (e.g. 1.5), or a method spec whose speed-up, "
                             "measured in this run, is the target (e.g. tome:r=13)")
    target.add_argument("--gmacs", type=float, metavar="G", help="target GMACs per image (at most)")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help=f"methods to search, of {', '.join(TUNABLE)} (default: every one that supports the model "
                        f"but mix: ppt, tome and a cut in one schedule, searched when named)")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="(default: %(default)s)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast to bfloat16 (default: %(default)s)")
    p.add_argument("--budget", type=float, default=10.0, metavar="MINUTES",
                   help="minutes for the whole run: the search stops early to leave time for measuring the "
                        "finalists; the setup and that measurement run whole, so a small budget can be overrun "
                        "(a note then says by how much) (default: %(default)s)")
    p.add_argument("--search-images", type=positive_int, default=SEARCH_IMAGES, metavar="N",
                   help="even positions searched on: the first half (at most 128) screens, the rest selects "
                        "(default: %(default)s)")
    p.add_argument("--runs", type=positive_int, default=8, metavar="N",
                   help="timed rounds of the interleaved timings (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                   help="folder for tune.csv and tune.png (default: .)")
    add_overwrite_arg(p)


def tune_table(args: argparse.Namespace, result: Any) -> Table:
    """The rows ``tokensparse tune`` measured, fastest last, the Pareto front and the choice marked."""
    speed = result.target_kind == "speedup"
    target = f"{result.target:.2f}x" if speed else f"{result.target:g} GMACs"
    table = Table(
        title=f"{args.model} | batch {args.batch_size} | {args.threads or torch.get_num_threads()} threads | "
              f"{args.device} {args.dtype} | target {target}",
        caption=("held-out images (odd positions): NN agree = % of images whose nearest neighbour stays the same, "
                 "1 - cos = 1 - mean cosine similarity of the embeddings to the unreduced ones (a model without a "
                 "classifier)" if result.features else
                 "held-out images (odd positions): agreement = % same top-1 as unreduced, KL = mean KL(unreduced || "
                 "reduced)") + "; speed-up measured interleaved in one run; front: not beaten on both speed and "
                "fidelity")
    agree, distance = ("NN agree %", "1 - cos") if result.features else ("agree %", "KL")
    for header in ("role", "spec", "front", "speed-up", "GMACs", agree, distance, "top-1 %"):
        table.add_column(header, justify="left" if header in ("role", "spec", "front") else "right",
                         overflow="fold")
    for r in result.rows:
        table.add_row(r.role, r.spec, "*" if r.pareto else "", fmt(r.speedup, 2) + "x", fmt(r.gmacs, 3),
                      fmt(r.agreement, 1), fmt(r.kl, 4), fmt(r.top1, 1))
    return table


def cmd_tune(args: argparse.Namespace) -> int:
    """Run ``tokensparse tune``."""
    console = table_console()
    check_target(args.speedup, args.gmacs)  # bad targets and methods fail before the model is loaded
    check_methods(args.methods)
    if not args.budget > 0:
        raise TokenSparseError(f"--budget must be a positive number of minutes, got {args.budget!r}")
    if not args.images.is_dir():
        raise TokenSparseError(f"image directory {str(args.images)!r} not found")
    check_writable_folder(args.out, "output folder")
    for name in ("tune.csv", "tune.png"):
        check_output_path(args.out / name, "tune output", args.overwrite)
    model = load_model(args)
    result = tune(model, args.images, speedup=args.speedup, gmacs=args.gmacs, methods=args.methods,
                  wnids=args.wnids, batch_size=args.batch_size, threads=args.threads, device=args.device,
                  dtype=args.dtype, budget=args.budget, limit=args.limit, search_images=args.search_images,
                  runs=args.runs)
    console.print(tune_table(args, result))
    agree, distance = ("neighbour agreement", "1 - cosine") if result.features else ("agreement", "KL")
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    write_tune_csv(result.rows, args.out / "tune.csv")
    plot_tune(result, args.out / "tune.png", title=f"{args.model} | batch {args.batch_size}")
    c = result.choice
    met = "meets" if result.met_target else "does NOT meet"
    console.print(f"searched {result.search_seconds:.0f} s, {result.seconds:.0f} s in all; wrote "
                  f"{args.out / 'tune.csv'} and {args.out / 'tune.png'}; the choice {met} the target: "
                  f"{fmt(c.speedup, 2)}x, {fmt(c.gmacs, 3)} GMACs, held-out {agree.removesuffix(' %')} "
                  f"{fmt(c.agreement, 1)}%, {distance} {fmt(c.kl, 4)}", markup=False)
    print(c.spec)
    return 0


# ----------------------------------------------------------------------------- main

def build_parser() -> ArgumentParser:
    """The ``tokensparse`` parser with one subparser per command."""
    parser = ArgumentParser(prog="tokensparse",
                            description="Token reduction for timm and Hugging Face transformers vision models.")
    parser.add_argument("--version", action="version", version=f"tokensparse {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_bench_parser(subparsers)
    add_train_parser(subparsers)
    add_calibrate_parser(subparsers)
    add_viz_parser(subparsers)
    add_sweep_parser(subparsers)
    add_export_parser(subparsers)
    add_tune_parser(subparsers)
    return parser


def _one_line(exc: BaseException) -> str:
    """The error's message on one line (a DataLoader worker's error: its own message, not the
    worker's traceback: :func:`~tokensparse.data.worker_error_message`)."""
    text = " ".join(worker_error_message(exc).split())
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

"""Image folders as datasets, with clear errors naming the bad folder, file or class.

Three layouts:

* class sub-folders ``ROOT/<wnid>/*.JPEG`` (nested folders allowed): torchvision's
  :class:`~torchvision.datasets.ImageFolder`, with class indices from a wnids file (line i =
  class i) when given, else the sorted folder names;
* flat files ``ROOT/<wnid>_<name>.JPEG`` (as in the shared ImageNet sample): needs a wnids file;
* unlabelled folders (:class:`UnlabelledImages`): every image file under ROOT, any names, flat
  or nested, label ``-1`` (calibration needs no labels).

An image file is one whose extension Pillow reads (:data:`IMAGE_EXTENSIONS`), hidden files
excluded. Items are ``(transform(rgb PIL image), label)``; an unreadable image raises
:class:`TokenSparseError` naming the file.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm.data
from PIL import Image, ImageFile
from torch import nn
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import make_dataset

from .errors import TokenSparseError
from .families.hf import hf_data_config, hf_input_size, is_transformers_model
from .utils import positive_int

__all__ = [
    "IMAGE_EXTENSIONS",
    "UNLABELLED",
    "ImageNetFolder",
    "UnlabelledImages",
    "check_class_count",
    "check_image",
    "data_config",
    "dataset_classes",
    "dataset_files",
    "drop_unreadable",
    "image_dataset",
    "image_directory",
    "is_image_file",
    "load_rgb",
    "model_transform",
    "read_wnids",
    "scan_images",
    "split_dataset",
    "worker_error_message",
]

UNLABELLED = -1
"""The label of every item of :class:`UnlabelledImages`."""

_NOT_IMAGES = frozenset({"MPEG"})  # Pillow only identifies these (video); stubs are dropped below


def _pillow_extensions() -> frozenset[str]:
    """Lower-case extensions of every format Pillow can decode (stub plugins excluded)."""
    Image.init()
    readable = {fmt for fmt, (factory, _) in Image.OPEN.items()  # a class, or a function (JPEG)
                if fmt not in _NOT_IMAGES
                and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in readable)


IMAGE_EXTENSIONS: frozenset[str] = _pillow_extensions()
_LAYOUTS = ("class sub-folders (ROOT/<wnid>/*.JPEG)", "flat files (ROOT/<wnid>_<name>.JPEG)")
_EXAMPLES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif")
_EXTENSIONS_TEXT = (f"an image extension Pillow reads ({', '.join(_EXAMPLES)}, ... "
                    f"{len(IMAGE_EXTENSIONS)} in all)")


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True for a non-hidden file name with an extension Pillow reads (the file is not opened)."""
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


_IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """The decoded RGB image at ``path``; TokenSparseError naming the file if unreadable."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except _IMAGE_ERRORS as exc:
        raise TokenSparseError(f"cannot read image {str(path)!r}: {exc}") from None


def check_image(path: str | os.PathLike[str]) -> None:
    """Decode the image at ``path`` as :func:`load_rgb` does, JPEGs at 1/8 size (all their data is
    still read, so a truncated or corrupt file fails as it would in training); TokenSparseError
    naming the file if unreadable."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.convert("RGB")
    except _IMAGE_ERRORS as exc:
        raise TokenSparseError(f"cannot read image {str(path)!r}: {exc}") from None


def scan_images(paths: Sequence[str | os.PathLike[str]], progress: Callable[[], Any] | None = None) -> None:
    """Check every image of ``paths`` (:func:`check_image`) before expensive work starts.

    TokenSparseError naming the first unreadable file and how many others there are.
    ``progress()`` is called after each file.
    """
    bad: list[str] = []
    for path in paths:
        try:
            check_image(path)
        except TokenSparseError as exc:
            bad.append(str(exc))
        if progress is not None:
            progress()
    if bad:
        more = f" ({len(bad) - 1} more unreadable images)" if len(bad) > 1 else ""
        raise TokenSparseError(bad[0] + more)


def drop_unreadable(dataset: Dataset, progress: Callable[[], Any] | None = None) -> tuple[Dataset, list[Path]]:
    """``(the items of dataset whose image decodes, the files that do not)``: every file is checked
    once (:func:`check_image`); training and calibration skip unreadable images and report how
    many. TokenSparseError when no image is readable. ``progress()`` is called after each file."""
    files = dataset_files(dataset)
    keep, bad = [], []
    for i, path in enumerate(files):
        try:
            check_image(path)
            keep.append(i)
        except TokenSparseError:
            bad.append(path)
        if progress is not None:
            progress()
    if not keep:
        raise TokenSparseError(f"none of the {len(files)} images could be read (e.g. {str(bad[0])!r})")
    return (dataset if not bad else Subset(dataset, keep)), bad


def worker_error_message(exc: BaseException) -> str:
    """The original message of an error a DataLoader worker raised (other errors: their message).

    torch re-raises a worker's error in the main process with a message that holds the
    worker's whole traceback ("Caught TokenSparseError in DataLoader worker process 0.
    Original Traceback ... TokenSparseError: cannot read image ..."); this returns only the
    part after the last ``TokenSparseError:`` (the error's own type name).
    """
    text = str(exc)
    if "DataLoader worker process" not in text or "Original Traceback" not in text:
        return text
    lines = text.splitlines()
    head = re.compile(rf"^(?:[\w.]+\.)?{re.escape(type(exc).__name__)}: ")
    for i in range(len(lines) - 1, -1, -1):
        match = head.match(lines[i])
        if match:
            return "\n".join([lines[i][match.end():], *lines[i + 1:]]).strip()
    return next((ln.strip() for ln in reversed(lines) if ln.strip()), text)


def read_wnids(path: str | os.PathLike[str]) -> list[str]:
    """WordNet ids from a file whose line i is class i (first whitespace token)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TokenSparseError(f"wnids file {str(p)!r} not found")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenSparseError(f"cannot read wnids file {str(p)!r}: {exc}") from None
    wnids = [line.split()[0] for line in lines if line.strip()]
    if not wnids:
        raise TokenSparseError(f"wnids file {str(p)!r} is empty (expected one wnid per line)")
    return wnids


def image_directory(root: str | os.PathLike[str]) -> Path:
    """``root`` as a Path; TokenSparseError unless it is an existing folder."""
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "not found"
        raise TokenSparseError(f"image directory {str(path)!r} {what}")
    return path


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _flat_images(root: Path) -> list[tuple[Path, str]]:
    """``(image, wnid)`` for every ``<wnid>_<name>.<ext>`` image directly in ``root``."""
    found = []
    for p in sorted(root.iterdir()):
        if not (is_image_file(p) and p.is_file()):
            continue
        wnid, sep, _ = p.stem.partition("_")
        if not sep or not wnid:
            raise TokenSparseError(
                f"cannot tell the class of image {str(p)!r}: flat files must be named "
                f"<wnid>_<name>{p.suffix}")
        found.append((p, wnid))
    return found


def _unknown_class(image: str | os.PathLike[str], wnid: str, n_classes: int) -> TokenSparseError:
    return TokenSparseError(f"image {str(image)!r} has class {wnid!r}, which is not in the class "
                            f"list ({n_classes} classes)")


class ImageNetFolder(ImageFolder):
    """ImageNet-style images with WordNet-id labels: class sub-folders or flat files.

    ``root/<wnid>/*.JPEG`` (class sub-folders, read by torchvision's ``ImageFolder``) or
    ``root/<wnid>_<name>.JPEG`` (flat); both may be mixed. Class indices come from
    ``wnids_file`` (line i = class i); without one, sub-folder layouts use the sorted folder
    names, and flat files are an error. Items are ``(transform(image), class_index)``;
    images are RGB PIL images before the transform. ``samples`` holds ``(Path, index)`` in
    path order (flat files first).
    """

    def __init__(self, root: str | os.PathLike[str], wnids_file: str | os.PathLike[str] | None = None,
                 transform: Callable[[Image.Image], Any] | None = None) -> None:
        path = image_directory(root)
        self.wnids_file = wnids_file
        self._flat = _flat_images(path)  # needed by find_classes, which ImageFolder calls first
        super().__init__(path, transform=transform, loader=load_rgb, is_valid_file=is_image_file,
                         allow_empty=True)
        self.root = path
        self.samples = [(Path(p), t) for p, t in self.samples]
        self.imgs = self.samples
        if not self.samples:
            raise TokenSparseError(f"no images found in {str(path)!r}; tried {' and '.join(_LAYOUTS)} "
                                   f"with {_EXTENSIONS_TEXT}")

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        """Classes from the wnids file (line i = class i), else the sorted class folder names."""
        if self.wnids_file is not None:
            classes = read_wnids(self.wnids_file)
        elif self._flat:
            raise TokenSparseError(
                f"images in {str(directory)!r} are flat files (e.g. {self._flat[0][0].name!r}): "
                f"give a wnids file (line i = class i) to map them to class indices")
        else:
            classes = [p.name for p in _class_dirs(Path(directory))]
        return classes, {w: i for i, w in reversed(list(enumerate(classes)))}  # first line wins

    def make_dataset(self, directory: str | os.PathLike[str], class_to_idx: dict[str, int],  # type: ignore[override]
                     extensions: tuple[str, ...] | None = None,
                     is_valid_file: Callable[[str], bool] | None = None,
                     allow_empty: bool = False) -> list[tuple[str | Path, int]]:
        """Flat files (by name) then torchvision's scan of the class folders."""
        root = Path(directory)
        n = len(class_to_idx)
        samples: list[tuple[str | Path, int]] = []
        for path, wnid in self._flat:
            if wnid not in class_to_idx:
                raise _unknown_class(path, wnid, n)
            samples.append((path, class_to_idx[wnid]))
        for folder in _class_dirs(root):
            if folder.name not in class_to_idx:
                image = next((p for p in sorted(folder.rglob("*")) if is_image_file(p) and p.is_file()), None)
                if image is not None:
                    raise _unknown_class(image, folder.name, n)
        if class_to_idx:
            samples += make_dataset(root, class_to_idx, is_valid_file=is_valid_file, allow_empty=True)
        return samples


class UnlabelledImages(Dataset):
    """Every image file under ``root`` (any names, flat or nested; hidden files and folders
    skipped), in path order; items are ``(transform(rgb image), -1)``."""

    def __init__(self, root: str | os.PathLike[str],
                 transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.root = image_directory(root)
        self.transform = transform
        files = [p for p in sorted(self.root.rglob("*"))
                 if is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
                 and p.is_file()]
        if not files:
            raise TokenSparseError(f"no images found in {str(self.root)!r} (searched all sub-folders "
                                   f"for files with {_EXTENSIONS_TEXT})")
        self.samples: list[tuple[Path, int]] = [(p, UNLABELLED) for p in files]
        self.targets = [UNLABELLED] * len(files)
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = load_rgb(self.samples[index][0])
        return (self.transform(img) if self.transform is not None else img), UNLABELLED


def _unwrap(dataset: Dataset) -> tuple[Dataset, list[int] | None]:
    """The dataset inside nested :class:`~torch.utils.data.Subset` s and the indices into it (None: all)."""
    indices: list[int] | None = None
    while isinstance(dataset, Subset):
        outer = list(dataset.indices)
        indices = outer if indices is None else [outer[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def dataset_files(dataset: Dataset) -> list[Path]:
    """The image file of every item of ``dataset`` (an :class:`ImageNetFolder` or
    :class:`UnlabelledImages`, possibly inside Subsets: :func:`split_dataset`), in item order."""
    base, indices = _unwrap(dataset)
    samples = getattr(base, "samples", None)
    if samples is None:
        raise TokenSparseError(f"cannot list the image files of a {type(base).__name__}")
    files = [Path(p) for p, _ in samples]
    return files if indices is None else [files[i] for i in indices]


def dataset_classes(dataset: Dataset) -> list[str]:
    """The class list of ``dataset`` (possibly inside Subsets); empty when unlabelled."""
    return list(getattr(_unwrap(dataset)[0], "classes", []))


def check_class_count(dataset: Dataset, model: nn.Module, model_name: str = "") -> None:
    """TokenSparseError unless every class index of ``dataset`` is an output of ``model``'s head
    (a class list may be shorter than the head, not longer)."""
    classes = dataset_classes(dataset)
    outputs = getattr(model, "num_classes", None)
    if isinstance(outputs, int) and outputs > 0 and len(classes) > outputs:
        base = _unwrap(dataset)[0]
        source = getattr(base, "wnids_file", None) or getattr(base, "root", "the image folder")
        label = f"model {model_name!r}" if model_name else "the model"
        raise TokenSparseError(
            f"the class list {str(source)!r} has {len(classes)} classes but the head of {label} has "
            f"{outputs} outputs; give a class list with at most {outputs} entries (line i = class i)")


def split_dataset(dataset: Dataset, split: str = "all", limit: int | None = None) -> Dataset:
    """The first ``limit`` items (all when None), then ``all`` of them or their ``even`` / ``odd``
    positions (datasets here are in path order)."""
    if split not in ("all", "even", "odd"):
        raise TokenSparseError(f"split must be all, even or odd; got {split!r}")
    if limit is not None:
        dataset = Subset(dataset, range(min(positive_int(limit, "limit"), len(dataset))))
    if split == "all":
        return dataset
    part = Subset(dataset, range(0 if split == "even" else 1, len(dataset), 2))
    if len(part) == 0:
        kept = f"the first {limit} images" if limit is not None else "the folder"
        raise TokenSparseError(f"split {split!r} leaves no images: {kept} has {len(dataset)} image"
                               f"{'s' * (len(dataset) != 1)}; give more images, or split all")
    return part


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config of ``model`` (input size, interpolation, mean, std, crop), with the input
    size the patch embedding was built for where a timm model was built for another one than its
    pretrained config's (e.g. ``img_size=64``); for a transformers model the same keys from its
    image processor (:func:`~tokensparse.families.hf.hf_data_config`: its resize, crop ratio and
    normalisation) at the size the model is configured for (``config.image_size``)."""
    if is_transformers_model(model):
        # the processor's resize, crop ratio and normalisation, at the size the model is built for
        # (config.image_size): a processor saved with another size would feed images the position
        # embeddings do not fit; export and bench use the same size
        cfg = hf_data_config(model)
        cfg["input_size"] = hf_input_size(model)
        return cfg
    cfg = timm.data.resolve_data_config({}, model=model)
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(built, tuple) and len(built) == 2 and getattr(model.patch_embed, "strict_img_size", False):
        cfg["input_size"] = (cfg["input_size"][0], *built)
    return cfg


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of ``model``'s input: :func:`data_config`'s, or a transformers model's configured
    size (no image processor needed)."""
    if is_transformers_model(model):
        return hf_input_size(model)
    size = data_config(model)["input_size"]
    return int(size[0]), int(size[1]), int(size[2])


def model_transform(model: nn.Module, training: bool = False) -> Callable[[Image.Image], Any]:
    """``model``'s timm preprocessing: eval (resize, centre crop, normalise) or train augmentation."""
    cfg = data_config(model)
    if not training:
        return timm.data.create_transform(**cfg)
    return timm.data.create_transform(input_size=cfg["input_size"], is_training=True,
                                      interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"])


def image_dataset(images: str | os.PathLike[str], model: nn.Module,
                  wnids: str | os.PathLike[str] | None = None, training: bool = True,
                  split: str = "all", limit: int | None = None, labelled: bool = True) -> Dataset:
    """An image folder with ``model``'s timm train or eval transforms, ``limit`` and ``split`` applied.

    ``labelled``: an :class:`ImageNetFolder` (either layout, ``wnids`` as there); otherwise
    :class:`UnlabelledImages` (``wnids`` unused).
    """
    transform = model_transform(model, training)
    data: Dataset = (ImageNetFolder(images, wnids, transform=transform) if labelled
                     else UnlabelledImages(images, transform=transform))
    return split_dataset(data, split, limit)


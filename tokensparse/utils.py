"""Small I/O helpers shared by the whole package: atomic file writes, progress bars, devices.

A leaf module: it imports nothing from ``tokensparse`` but :mod:`tokensparse.errors`.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import TokenSparseError

__all__ = [
    "Advance",
    "atomic_write",
    "check_writable_folder",
    "output_logits",
    "positive_int",
    "progress_bar",
    "remove_stale_temp_files",
    "resolve_device",
]


def _temp_name(name: str) -> str:
    """The name :func:`atomic_write` gives its temporary file for a target named ``name``."""
    return f".{name}.{uuid.uuid4().hex[:12]}.tmp"


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary file name beside ``path`` (removed by :func:`remove_stale_temp_files` if left)."""
    p = Path(path)
    return p.parent / _temp_name(p.name)


def _temp_pattern(name: str) -> re.Pattern[str]:
    """Matches exactly the temporary names :func:`_temp_name` makes for ``name``."""
    return re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{12}}\.tmp")


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], Any], *,
                 text: bool = False, what: str = "") -> Path:
    """Write ``path`` atomically: either the complete new content is there, or the old file is.

    ``write(f)`` fills a temporary file in the same folder (``f`` is opened ``"wb"``, or ``"w"``
    with UTF-8 and ``newline=""`` when ``text`` is True); it is flushed, ``fsync``-ed and moved
    onto ``path`` with ``os.replace``. The parent folder is created if missing. On any failure
    the temporary file is removed and ``path`` is left as it was; an ``OSError`` becomes a
    :class:`TokenSparseError` ``"cannot write [what ]'path': reason"``, anything else
    propagates unchanged. Returns ``path`` as a :class:`~pathlib.Path`.

    Examples: ``atomic_write(p, lambda f: torch.save(obj, f))``,
    ``atomic_write(p, lambda f: f.write(safetensors.torch.save(tensors)))``,
    ``atomic_write(p, lambda f: json.dump(data, f), text=True)``.
    """
    target = Path(path)
    tmp = target.with_name(_temp_name(target.name))
    created = False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: never reuse a file; mode 0o666 so the umask applies as to any new file
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        created = True
        with (open(fd, "w", encoding="utf-8", newline="") if text else open(fd, "wb")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        created = False
    except OSError as exc:
        label = f"{what} " if what else ""
        raise TokenSparseError(f"cannot write {label}{str(target)!r}: {exc.strerror or exc}") from None
    finally:
        if created:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return target


def write_rows_csv(rows: Sequence[Any], row_type: type, path: str | os.PathLike[str]) -> Path:
    """Write dataclass ``rows`` (atomically, :func:`atomic_write`) as CSV: one column per field of
    ``row_type``, in the order of its ``columns`` class attribute if it has one, else of its fields;
    None as an empty cell."""
    names = list(getattr(row_type, "columns", None) or (f.name for f in dataclasses.fields(row_type)))

    def write(f: IO[Any]) -> None:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in dataclasses.asdict(row).items()})

    return atomic_write(path, write, text=True)


def remove_stale_temp_files(folder: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` for targets named ``names``.

    A process killed while writing leaves ``.<name>.<12 hex digits>.tmp`` behind (the target
    itself is untouched). Only files of exactly that pattern are removed, nothing else; call
    it when no write to those targets is in progress. Returns the removed paths (a missing
    folder or a file that cannot be removed is skipped).
    """
    patterns = [_temp_pattern(n) for n in names]
    removed = []
    with contextlib.suppress(OSError):
        for entry in sorted(Path(folder).iterdir()):
            if any(p.fullmatch(entry.name) for p in patterns) and entry.is_file() and not entry.is_symlink():
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
    return removed


def check_writable_folder(folder: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Create ``folder`` (and its parents) if missing and check a file can be written in it.

    The check writes and removes a probe file (``.tokensparse-probe.<hex>.tmp``), so it holds
    for the files :func:`atomic_write` will put there. TokenSparseError
    ``"cannot write <what> 'folder': reason"`` if the folder is a file, cannot be created or
    is not writable. Returns the folder as a :class:`~pathlib.Path`.
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise TokenSparseError(f"cannot write {what} {str(path)!r}: it is a file, not a folder")
    probe = path / f".tokensparse-probe.{uuid.uuid4().hex[:12]}.tmp"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TokenSparseError(f"cannot write {what} {str(path)!r}: it cannot be created "
                               f"({exc.strerror or exc})") from None
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as exc:
        raise TokenSparseError(f"cannot write {what} {str(path)!r}: no file can be created in it "
                               f"({exc.strerror or exc})") from None
    return path


class Advance(Protocol):
    """What :func:`progress_bar` yields: ``advance(n=1, info=None)``."""

    def __call__(self, n: int = 1, info: str | None = None) -> None: ...


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, *, completed: int = 0,
                 transient: bool = True) -> Iterator[Advance]:
    """A rich progress bar on stderr; yields ``advance(n=1, info=None)``.

    ``advance`` moves the bar ``n`` steps and, if ``info`` is given, replaces the text shown
    after it (e.g. loss values). ``completed``: steps already done (a resumed run). A
    ``transient`` bar disappears when done and is shown only on a terminal; a lasting one
    (``transient=False``) leaves its final state on stderr, also in logs. ``enabled=False``
    shows nothing.
    """
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    shown = enabled and (console.is_terminal or not transient)
    with Progress(*columns, console=console, transient=transient, disable=not shown) as bar:
        task = bar.add_task(description, total=total, completed=completed, info="")

        def advance(n: int = 1, info: str | None = None) -> None:
            if info is None:
                bar.advance(task, n)
            else:
                bar.update(task, advance=n, info=info)

        yield advance


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse a device string; TokenSparseError if malformed or unavailable."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TokenSparseError(f"bad device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TokenSparseError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise TokenSparseError(f"device {device!r} requested but MPS is not available")
    return dev


def positive_int(value: int, what: str) -> int:
    """``value`` if it is an int >= 1 (bool excluded); TokenSparseError naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TokenSparseError(f"{what} must be a positive integer, got {value!r}")
    return value


def output_logits(out: Any) -> torch.Tensor:
    """Class logits from a model's output: a tensor (timm) or an output with ``.logits`` (transformers
    classifiers); a clear error for a model that outputs features."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TokenSparseError(f"the model outputs a {type(out).__name__}, not class logits: this needs a classifier "
                           f"(for transformers, a ...ForImageClassification model)")


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Put models in eval mode, restoring each one's previous mode afterwards."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)

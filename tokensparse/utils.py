"""Small I/O helpers shared by the whole package: atomic file writes, progress bars, devices.

A leaf module: it imports nothing from ``tokensparse`` but :mod:`tokensparse.errors`.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import TokenSparseError

__all__ = ["Advance", "atomic_write", "positive_int", "progress_bar", "resolve_device"]


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
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
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

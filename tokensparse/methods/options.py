"""Methods' options: how each is declared (:class:`OptionInfo`) and checked, with one clear error per bad value."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import TokenSparseError


@dataclass(frozen=True)
class OptionInfo:
    """One option of a method: its name, default and a one-line help."""
    name: str
    default: Any
    help: str


# ----------------------------------------------------------------------------- validation helpers

def check_keep_rate(value: Any, name: str = "keep_rate") -> float:
    """A keep rate in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise TokenSparseError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def check_count(value: Any, name: str, minimum: int = 0) -> int:
    """A non-negative (or >= minimum) integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TokenSparseError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def block_counts(values: Sequence[Any], depth: int, name: str = "r") -> list[int]:
    """A per-block count list (``r`` of ToMe, MCTF), checked, with zeros for the blocks after it."""
    if len(values) > depth:
        raise TokenSparseError(f"{name} has {len(values)} entries but the model has {depth} blocks")
    for v in values:
        check_count(v, name)
    return list(values) + [0] * (depth - len(values))


def check_counts(value: Any, name: str = "r", optional: bool = False) -> None:
    """A count per block: an integer >= 0, or a list of them (checked against the depth by
    :func:`block_counts`); None too when ``optional``."""
    if optional and value is None:
        return
    if not isinstance(value, (list, tuple)):
        check_count(value, name)


def check_number(value: Any, name: str, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """A number in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        low < value if low_open else low <= value) and value <= high
    if not ok:
        allowed = (f"{'>' if low_open else '>='} {low}" if high == math.inf else
                   f"in {'(' if low_open else '['}{low}, {high}]")
        raise TokenSparseError(f"{name} must be a number {allowed}, got {value!r}")
    return float(value)


PROP_ATTN = OptionInfo("prop_attn", True, "proportional attention: add log(size) to the attention logits")
"""The option of every merging method: proportional attention, on by default (ToMe's)."""

LOCATIONS = OptionInfo("locations", None, "block indices (0-based); default 1/4, 1/2, 3/4 of the depth "
                                          "(3, 6, 9 for 12 blocks)")
"""The option of the methods that reduce at a few blocks (PPT, Top-K / EViT)."""


def r_option(default: int | None, verb: str, note: str = "", per: str = "block") -> OptionInfo:
    """The ``r`` option: tokens ``verb`` (merged, pruned, removed) in every block (or at each of a few
    locations, ``per="location"``), one count for all or a list with one entry each; ``note`` ends the help."""
    return OptionInfo("r", default, f"tokens {verb} per {per}: an int, or a list with one entry per {per}{note}")


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TokenSparseError(f"{name} must be true or false, got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise TokenSparseError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def default_locations(depth: int) -> list[int]:
    """Blocks at 1/4, 1/2 and 3/4 of the depth (3, 6, 9 for 12 blocks)."""
    return sorted({max(0, min(depth - 1, round(depth * f))) for f in (0.25, 0.5, 0.75)})


def resolve_locations(locations: Sequence[int] | int | None, depth: int) -> list[int]:
    """Validate block indices against ``depth``; None gives :func:`default_locations`."""
    if locations is None:
        return default_locations(depth)
    if isinstance(locations, int) and not isinstance(locations, bool):
        locations = [locations]
    if not isinstance(locations, (list, tuple)) or not locations:
        raise TokenSparseError(f"locations must be a non-empty list of block indices, got {locations!r}")
    for loc in locations:
        if isinstance(loc, bool) or not isinstance(loc, int) or not 0 <= loc < depth:
            raise TokenSparseError(
                f"location {loc!r} is outside the model's blocks: valid block indices are 0..{depth - 1}")
    if len(set(locations)) != len(locations):
        raise TokenSparseError(f"locations must not repeat, got {list(locations)}")
    return sorted(locations)


def per_location(value: Any, n: int, name: str) -> list[Any]:
    """Broadcast one value to ``n`` locations, or check a list has exactly ``n`` entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise TokenSparseError(f"{name} has {len(value)} entries but there are {n} locations")
        return list(value)
    return [value] * n


ROUNDINGS = ("ceil", "floor")


def keep_count(keep_rate: float, n: int, rounding: str) -> int:
    """Tokens kept out of ``n`` at ``keep_rate``, at least 1 and at most ``n``.

    ``rounding`` is each method's own, from its authors' code, so every caller says which:
    ``"ceil"`` (EViT / Top-K: ``math.ceil(keep_rate * N)``) or ``"floor"`` (Evo-ViT and
    DynamicViT: ``int(N * ratio)``). A tiny tolerance absorbs float error in products that are
    whole numbers (``0.7 ** 2 * 196``).
    """
    if rounding == "ceil":
        k = math.ceil(keep_rate * n - 1e-6)
    elif rounding == "floor":
        k = math.floor(keep_rate * n + 1e-6)
    else:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    return max(1, min(n, k))



"""Method spec strings: ``"NAME:key=value,key=value"``.

Values may be numbers, ``true``/``false``, ``none``, bracketed lists (``[3,6,9]``) or bare
strings. A value in double or single quotes is a string taken as written, commas and
brackets included (``dynamicvit:predictors="runs/a,b.safetensors"``). Each key may be given
once. The same strings are accepted by :func:`tokensparse.patch` and by the CLI.

Block-reducing methods combine with ``+``, each at its own blocks
(``ppt:locations=[3,6],r=50+tome:r=[0,0,0,0,0,0,0,12,12,12]``): such a spec parses as the
``mix`` method with the parts as its ``parts`` option.
"""
from __future__ import annotations

import re
from typing import Any

from .errors import TokenSparseError

QUOTES = "\"'"
MIX = "mix"
"""The method name of a spec whose parts are joined by ``+``."""
_PART_START = re.compile(r"\s*[A-Za-z_][\w-]*\s*(:|$)")


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets and quotes (a quote opens only at the start of a value)."""
    parts, depth, cur, quote, prev = [], 0, [], "", ""
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in QUOTES and prev in ("", "=", "[", sep):
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise TokenSparseError(f"unbalanced ']' in {text!r}")
        if ch == sep and depth == 0 and not quote:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        if not ch.isspace():
            prev = ch
    if quote:
        raise TokenSparseError(f"unclosed quote {quote} in {text!r}")
    if depth != 0:
        raise TokenSparseError(f"unbalanced '[' in {text!r}")
    parts.append("".join(cur))
    return parts


def _is_quoted(text: str) -> bool:
    return len(text) >= 2 and text[0] in QUOTES and text[-1] == text[0]


def parse_value(text: str) -> Any:
    """Parse one option value: quoted string, number, bool, none, list or bare string."""
    t = text.strip()
    if _is_quoted(t):
        return t[1:-1]
    if t.startswith("[") and t.endswith("]"):
        inner = t[1:-1].strip()
        return [parse_value(p) for p in _split_top_level(inner)] if inner else []
    low = t.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def split_parts(spec: str) -> list[str]:
    """The parts of a spec joined by ``+`` (outside brackets and quotes, and only where a method
    name follows, so ``threshold=1e+5`` stays whole); one part for a plain spec."""
    parts: list[str] = []
    for piece in _split_top_level(spec, "+"):
        if parts and piece.strip() and not _PART_START.match(piece):
            parts[-1] += "+" + piece
        else:
            parts.append(piece)
    return [p.strip() for p in parts]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"NAME:key=value,..."`` into the method name and its options.

    A key given twice is an error (``tome:r=4,r=8``). Parts joined by ``+`` give
    ``("mix", {"parts": [part, ...]})``, each part a spec written as :func:`format_spec` does.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise TokenSparseError(f"method spec must be a non-empty string, got {spec!r}")
    parts = split_parts(spec)
    if len(parts) > 1:
        if any(not p for p in parts):
            raise TokenSparseError(f"empty part in method spec {spec!r}: join method specs with '+'")
        parsed = [parse_spec(p) for p in parts]
        if any(name == MIX for name, _ in parsed):
            raise TokenSparseError(f"a part of {spec!r} is itself a mix: list every part once, joined by '+'")
        return MIX, {"parts": [format_spec(name, options) for name, options in parsed]}
    name, _, rest = spec.strip().partition(":")
    options: dict[str, Any] = {}
    if rest.strip():
        for item in _split_top_level(rest):
            if not item.strip():
                continue
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise TokenSparseError(
                    f"bad option {item!r} in method spec {spec!r}: expected key=value")
            if key.strip() in options:
                raise TokenSparseError(
                    f"option {key.strip()!r} is given twice in method spec {spec!r}; give each option once")
            options[key.strip()] = parse_value(value)
    return name.strip().lower(), options


def _format_string(v: str) -> str:
    """``v`` as written, or quoted when it would not read back as the same string."""
    plain = v and not any(c in v for c in ",[]" + QUOTES) and v == v.strip() and parse_value(v) == v
    if plain:
        return v
    quote = next((q for q in QUOTES if q not in v), None)
    if quote is None:
        raise TokenSparseError(f"option value {v!r} holds both kinds of quotes and cannot be written in a spec string")
    return f"{quote}{v}{quote}"


def format_spec(name: str, options: dict[str, Any]) -> str:
    """Inverse of :func:`parse_spec` (for tables and file names); strings that would not read
    back as written (commas, brackets, quotes, or text that looks like a number) are quoted."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(fmt(x) for x in v) + "]"
        if isinstance(v, str):
            return _format_string(v)
        return str(v)
    if not options:
        return name
    if name == MIX and set(options) == {"parts"} and isinstance(options["parts"], (list, tuple)) \
            and len(options["parts"]) > 1 and all(isinstance(p, str) for p in options["parts"]):
        return "+".join(options["parts"])
    return name + ":" + ",".join(f"{k}={fmt(v)}" for k, v in options.items())

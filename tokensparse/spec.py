"""Method spec strings: ``"NAME:key=value,key=value"``.

Values may be numbers, ``true``/``false``, ``none``, bracketed lists (``[3,6,9]``) or bare
strings. The same strings are accepted by :func:`tokensparse.patch` and by the CLI.
"""
from __future__ import annotations

from typing import Any

from .errors import TokenSparseError


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise TokenSparseError(f"unbalanced ']' in {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise TokenSparseError(f"unbalanced '[' in {text!r}")
    parts.append("".join(cur))
    return parts


def parse_value(text: str) -> Any:
    """Parse one option value: number, bool, none, list or string."""
    t = text.strip()
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
    if (t.startswith('"') and t.endswith('"')) or (t.startswith("'") and t.endswith("'")):
        return t[1:-1]
    return t


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"NAME:key=value,..."`` into the method name and its options."""
    if not isinstance(spec, str) or not spec.strip():
        raise TokenSparseError(f"method spec must be a non-empty string, got {spec!r}")
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
            options[key.strip()] = parse_value(value)
    return name.strip().lower(), options


def format_spec(name: str, options: dict[str, Any]) -> str:
    """Inverse of :func:`parse_spec` (for tables and file names)."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(fmt(x) for x in v) + "]"
        return str(v)
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={fmt(v)}" for k, v in options.items())

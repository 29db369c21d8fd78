"""The fields every protocol module declares its frames with: one vocabulary, one wording.

Each reader takes a decoded frame (a mapping) and a field's name, and returns the value in the
type the field has, or raises :class:`crowdd.wire.WireError` ``bad_field`` naming the field and
what it must be. A JSON ``true`` is never an integer; a number is finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeGuard

from crowdd import wire
from crowdd.errors import ErrorCode
from crowdd.text import plain


def bad(name: str, message: str) -> wire.WireError:
    """A ``bad_field`` error naming ``name``."""
    return wire.WireError(ErrorCode.BAD_FIELD, message, field=name)


def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(frame: Mapping[str, Any], name: str, *, lo: int = 0) -> int:
    """An integer ``>= lo``."""
    v = frame.get(name)
    if not is_int(v) or v < lo:
        raise bad(name, f"field {name!r} must be an integer >= {lo}, got {v!r}")
    return v


def opt_integer(frame: Mapping[str, Any], name: str, *, lo: int = 0) -> int | None:
    """An integer ``>= lo``, or null (absent)."""
    return None if frame.get(name) is None else integer(frame, name, lo=lo)


def flag(frame: Mapping[str, Any], name: str, default: bool | None = None) -> bool:
    """A boolean (``default`` when absent; None: required)."""
    value = frame.get(name, default)
    if not isinstance(value, bool):
        raise bad(name, f"field {name!r} must be a boolean, got {value!r}")
    return value


def text(frame: Mapping[str, Any], name: str, lo: int, hi: int, default: str | None = None) -> str:
    """``lo``..``hi`` printable characters (``default`` when absent; None: required)."""
    value = frame.get(name, default)
    if not isinstance(value, str):
        raise bad(name, f"field {name!r} must be a string")
    if not lo <= len(value) <= hi or not value.isprintable():
        raise bad(name, f"field {name!r} must be {lo}..{hi} printable characters")
    return value


def opt_words(frame: Mapping[str, Any], name: str, limit: int = 4096) -> str | None:
    """A peer's words, made plain for a terminal (:func:`crowdd.text.plain`), or null."""
    v = frame.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise bad(name, f"field {name!r} must be a string or null")
    return plain(v, limit)


def opt_number(frame: Mapping[str, Any], name: str) -> float | None:
    """A finite number, or null."""
    v = frame.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(name, f"field {name!r} must be a finite number or null")
    return float(v)


def port(value: Any, name: str) -> int:
    """A TCP port, 1..65535."""
    if not is_int(value) or not 1 <= value <= 65535:
        raise bad(name, f"field {name!r} must be a port 1..65535, got {value!r}")
    return value


def expect(frame: Mapping[str, Any], kind: str) -> None:
    """A reply of type ``kind``; a peer's ``error`` frame raises :class:`crowdd.wire.RemoteError`."""
    wire.raise_if_error(frame)
    if frame.get("type") != kind:
        raise wire.WireError(ErrorCode.UNKNOWN_TYPE, f"expected a {kind!r} frame, got {frame.get('type')!r}")


__all__ = ["bad", "expect", "flag", "integer", "is_int", "opt_integer", "opt_number", "opt_words", "port", "text"]

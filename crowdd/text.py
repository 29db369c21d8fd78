"""Peer-chosen words on their way to a person: no control characters, ever.

A member's name, a host's dataset name, an error a host sends: any of them could carry
terminal escape sequences (clear the screen, rewrite a line, set the title). They are made
plain where they arrive (:func:`plain`), and the CLI writes through :class:`PlainWriter`, which
lets only printable characters and newlines through. (The TUI shows them as text, never
markup: :mod:`crowdd.tui.widgets`.)
"""

from __future__ import annotations

import io
from typing import TextIO


def plain(text: str, limit: int | None = None) -> str:
    """``text`` without control characters (escape, carriage return, bell...), at most ``limit`` long."""
    out = "".join(c for c in text if c.isprintable())
    return out if limit is None else out[:limit]


class PlainWriter(io.TextIOBase):
    """Writes to ``out`` only printable characters and newlines."""

    def __init__(self, out: TextIO) -> None:
        super().__init__()
        self._out = out

    def write(self, s: str) -> int:
        self._out.write("\n".join(plain(line) for line in s.split("\n")))
        return len(s)

    def flush(self) -> None:
        self._out.flush()

    def writable(self) -> bool:
        return True


__all__ = ["PlainWriter", "plain"]

"""JSON-lines events on stdout (one object per line, flushed), and their parser."""

from __future__ import annotations

import json
import threading
import time
from typing import IO, Any

from crowdd.job import EVENT_KINDS
from crowdd.wire import dumps


class EventWriter:
    """Writes one JSON object per line; thread-safe (the host reports from several threads)."""

    def __init__(self, stream: IO[str], clock: Any = time.time) -> None:
        self._stream = stream
        self._clock = clock
        self._lock = threading.Lock()

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = {"event": kind, "time": round(float(self._clock()), 3), **fields}
        line = dumps(event, separators=(",", ":"), default=_plain)  # NaN/inf → null
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass  # nobody reads stdout any more; keep working
        return event

    def error(self, message: str, field: str | None = None) -> dict[str, Any]:
        if field is None:
            return self.emit("error", message=message)
        return self.emit("error", message=message, field=field)


def _plain(obj: Any) -> Any:
    """numpy scalars and paths → JSON."""
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def parse_event(line: str | bytes) -> dict[str, Any] | None:
    """One stdout line → event dict, or None if the line is not an event."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("event") not in EVENT_KINDS:
        return None
    return obj


__all__ = ["EventWriter", "parse_event"]

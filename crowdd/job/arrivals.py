"""Wake the coordinator as soon as any scheduled round finishes.

``ClusterCoordinator`` gives each scheduled function a ``RemoteValue`` with its own
``threading.Event``; nothing in its API waits on several at once. :class:`Arrivals` swaps each
watched value's event for one that also sets a shared event, so the host's loop sleeps until
the first of its rounds is done instead of polling them in turn.
"""

from __future__ import annotations

import threading
import time
from typing import Any

# A value whose event was set in the instant of the swap is still seen within this long.
SAFETY_NET_SECS = 0.1


class _Chained(threading.Event):
    """An event that also sets ``also`` whenever it is set; ``previous`` is the one replaced."""

    def __init__(self, also: threading.Event, previous: threading.Event) -> None:
        super().__init__()
        self._also = also
        self.previous = previous

    def set(self) -> None:
        super().set()
        self._also.set()

    def clear(self) -> None:  # TF runs the function again elsewhere: neither says done
        super().clear()
        self.previous.clear()


def _done(remote_value: Any) -> bool:
    event = remote_value._status_available_event
    if isinstance(event, _Chained) and event.previous.is_set() and not event.is_set():
        event.set()  # TF set the one replaced in the swap's instant: a fetch waits on this one
    return bool(event.is_set())


class Arrivals:
    """Finished rounds among those :meth:`watch`-ed (TF's private attribute, checked)."""

    def __init__(self) -> None:
        self._any = threading.Event()

    def watch(self, remote_value: Any) -> None:
        old = getattr(remote_value, "_status_available_event", None)
        if not isinstance(old, threading.Event):
            raise TypeError(f"{type(remote_value).__name__} has no status event to watch")
        new = _Chained(self._any, old)
        remote_value._status_available_event = new
        if old.is_set():  # set before the swap (one set in the swap's instant: the safety net)
            new.set()

    def wait(self, pending: list[Any], timeout: float) -> int:
        """The position in ``pending`` of a finished value, or -1 after ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while True:
            self._any.clear()  # cleared before the scan: a value finishing after it sets it again
            for k, rv in enumerate(pending):
                if _done(rv):
                    return k
            left = end - time.monotonic()
            if left <= 0 or not pending:
                return -1
            self._any.wait(min(left, SAFETY_NET_SECS))


__all__ = ["SAFETY_NET_SECS", "Arrivals"]

"""The order in which a source serves its plan targets: one at a time, a late one skipped."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

logger = logging.getLogger(__name__)


class Turns:
    """Serve plan targets one at a time, in plan order; skip one that is late."""

    def __init__(self, order: Sequence[int], late_bound: float) -> None:
        self.order = list(order)
        self.late_bound = late_bound
        self.done: set[int] = set()
        self.skipped: set[int] = set()
        self.waiting: dict[int, float] = {}
        self.active: int | None = None
        self.free_since = time.monotonic()
        self._cond = asyncio.Condition()

    def planned(self, index: int) -> bool:
        return index in self.order and index not in self.done

    def _pick(self) -> int | None:
        if self.active is not None:
            return None
        for t in self.order:
            if t in self.done or t in self.skipped:
                continue
            if t in self.waiting:
                return t
            if time.monotonic() - self.free_since < self.late_bound:
                return None
            logger.info("target %d is late; serving the next one", t)
            self.skipped.add(t)
        ready = [t for t in self.order if t in self.waiting]
        return ready[0] if ready else None

    async def acquire(self, index: int, keepalive: float) -> bool:
        """True when it is ``index``'s turn; False after ``keepalive`` s (send one, retry)."""
        async with self._cond:
            self.waiting.setdefault(index, time.monotonic())
            deadline = time.monotonic() + keepalive
            while True:
                if self._pick() == index:
                    self.active = index
                    self.waiting.pop(index, None)
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    await asyncio.wait_for(self._cond.wait(), min(left, 0.25))
                except asyncio.TimeoutError:
                    pass

    async def leave(self, index: int) -> None:
        """A queued target went away: it no longer holds up the others."""
        async with self._cond:
            self.waiting.pop(index, None)
            if index not in self.done:
                self.skipped.add(index)
            self._cond.notify_all()

    async def release(self, index: int, completed: bool) -> None:
        async with self._cond:
            if self.active == index:
                self.active = None
                self.free_since = time.monotonic()
            (self.done if completed else self.skipped).add(index)
            self._cond.notify_all()


__all__ = ["Turns"]

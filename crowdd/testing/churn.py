"""Volunteers who come and go, on a :class:`crowdd.cli.demo.Crowd` (tests and benchmarks).

What a volunteer's machine does to a session, for real: :func:`freeze` stops a node's daemon
and every process below it (a laptop lid closing), :meth:`Crowd.kill_node` crashes it,
:func:`donate` switches a newcomer on mid-session. :class:`Watch` records, with the time each
arrived, the host's training progress from its control socket, and :class:`Availability`
which workers could train when; from both :func:`report` derives the longest stall of the
group's progress and the goodput (samples trained per second, over what the available
machines could train at the steady rate).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from crowdd.client.control import ControlClient
from crowdd.cli.demo import Node
from crowdd.testing.suspender import JobSuspender


def freeze(node: Node) -> JobSuspender:
    """SIGSTOP the node's daemon and every process below it (its job, the job's TF servers)."""
    if node.proc is None:
        raise RuntimeError(f"{node.name} is not running")
    s = JobSuspender(node.proc.pid)
    s.suspend()
    return s


async def donate(node: Node, on: bool = True) -> None:
    async with ControlClient(node.socket) as c:
        await c.donate(on)


@dataclass
class Watch:
    """One node's events as its control socket streams them, each with its arrival time
    (``time.monotonic()``)."""

    node: Node
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def _listen(self) -> None:
        while True:
            with contextlib.suppress(OSError, ConnectionError, EOFError):
                async for ev in ControlClient(self.node.socket).subscribe():
                    self.events.append((time.monotonic(), ev))
            await asyncio.sleep(0.2)  # the daemon is frozen or restarting: listen again

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def of(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, e) for t, e in self.events if e.get("event") == kind]

    async def wait(self, pred: Any, timeout: float) -> tuple[float, dict[str, Any]]:
        """The first event (from the start) that satisfies ``pred``, with its time."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for t, ev in self.events[seen:]:
                if pred(ev):
                    return t, ev
            seen = len(self.events)
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.node.name}: no such event within {timeout:g} s")
            await asyncio.sleep(0.05)

    def steps(self) -> list[tuple[float, int]]:
        """``(time, global step)`` of each training progress report of the host's job."""
        return [(t, int(e["step"])) for t, e in self.of("progress") if isinstance(e.get("step"), int)]


def longest_stall(points: list[tuple[float, int]], start: float, end: float) -> float:
    """The longest time within ``[start, end]`` during which the step count did not grow."""
    last = start
    worst = 0.0
    best = -1
    for t, step in points:
        if t < start:
            best = max(best, step)
            continue
        if t > end:
            break
        if step > best:
            worst = max(worst, t - last)
            last, best = t, step
    return max(worst, end - last)


class Availability:
    """How many trainers could train when: the host's own worker always, plus each worker
    while it is neither frozen, crashed, away nor yet to join (the schedule's truth, not the
    host's view of it: a slow retirement counts against goodput)."""

    def __init__(self, t0: float, up: set[str]) -> None:
        self.t0 = t0
        self.changes: list[tuple[float, frozenset[str]]] = [(t0, frozenset(up))]

    def set(self, name: str, up: bool, t: float | None = None) -> None:
        now = time.monotonic() if t is None else t
        cur = set(self.changes[-1][1])
        (cur.add if up else cur.discard)(name)
        self.changes.append((now, frozenset(cur)))

    def at(self, t: float) -> int:
        i = bisect.bisect_right([c[0] for c in self.changes], t) - 1
        return 1 + len(self.changes[max(i, 0)][1])

    def mean(self, start: float, end: float) -> float:
        """Time-weighted mean number of trainers (the host's included) over ``[start, end]``."""
        if end <= start:
            return float(self.at(start))
        edges = sorted({start, end, *(t for t, _ in self.changes if start < t < end)})
        total = sum((b - a) * self.at(a) for a, b in zip(edges, edges[1:]))
        return total / (end - start)


def samples_between(points: list[tuple[float, int]], start: float, end: float, batch_size: int) -> tuple[float, float]:
    """Samples trained from ``start`` to ``end`` (by the host's step counts) and the time they took."""
    inside = [(t, s) for t, s in points if start <= t <= end]
    if len(inside) < 2:
        return 0.0, 0.0
    (t0, s0), (t1, s1) = inside[0], inside[-1]
    return float((s1 - s0) * batch_size), t1 - t0


def goodput(rate: float, per_trainer: float, mean_trainers: float) -> float:
    """Samples per second trained ÷ (steady-state samples per second per trainer × mean trainers)."""
    return rate / (per_trainer * mean_trainers) if per_trainer > 0 and mean_trainers > 0 else 0.0


__all__ = ["Availability", "Watch", "donate", "freeze", "goodput", "longest_stall", "samples_between"]

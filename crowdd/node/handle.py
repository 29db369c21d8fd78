"""The daemon's hold on the session its current cycle runs: one :class:`SessionHandle` per cycle.

The daemon asks through it, whatever the session is doing at that moment:

- a worker's volunteer is busy (:meth:`SessionHandle.away`, said before the job is suspended or
  the worker leaves) or idle again (:meth:`SessionHandle.back`): the idle policy's watch;
- ``crowdd stop`` on a host mid-training (:meth:`SessionHandle.stop`): the job is asked to end
  early through its stop file (:data:`crowdd.job.STOP_FILE`), and then evaluates, checkpoints
  and saves the model trained so far, ending with ``done``.

The session's run says how, while it can: a worker's run binds its session's away/back senders
while its channel is up (:meth:`SessionHandle.bind_presence`; ``away`` is said again after a
reconnect while still away), and a host's run arms the stop with its job's directory while the
job trains (:meth:`SessionHandle.arm_stop`). A host's handle also carries how the session stays
open at the matchmaker so that newcomers join (:attr:`SessionHandle.link`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdd.job import STOP_FILE
from crowdd.plan import PlanMember

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenLink:
    """How a running session stays open at the matchmaker, so that newcomers join it:
    ``hello(members, free)`` is the open hello (:func:`crowdd.node.registration.open_hello`)."""

    hello: Callable[[Sequence[PlanMember], int], dict[str, Any]]
    matchmaker: Callable[[], tuple[str, int]]
    fingerprint: Callable[[], str]
    heartbeat: float


class SessionHandle:
    """One cycle's session, as the daemon reaches it."""

    def __init__(self, link: OpenLink | None = None) -> None:
        self.link = link
        self.away_reason: str | None = None
        self.stop_requested = False
        self._away: Callable[[str, bool], None] | None = None
        self._back: Callable[[], None] | None = None
        self._workdir: Path | None = None

    # -- a worker's presence
    def bind_presence(self, away: Callable[[str, bool], None] | None, back: Callable[[], None] | None) -> None:
        """The senders while the worker's channel is up (None, None: it is down)."""
        self._away, self._back = away, back
        if self.away_reason is not None and away is not None:
            away(self.away_reason, True)

    def away(self, reason: str, staying: bool = True) -> None:
        """The volunteer is busy: training goes on without this worker (``staying``), or it leaves."""
        self.away_reason = reason if staying else None
        if self._away is not None:
            self._away(reason, staying)

    def back(self) -> None:
        """Idle again (said only after an ``away``)."""
        was = self.away_reason
        self.away_reason = None
        if was is not None and self._back is not None:
            self._back()

    # -- a host's graceful stop
    def arm_stop(self, workdir: Path | None) -> None:
        """The host job trains in ``workdir`` (None: it ended)."""
        self._workdir = workdir

    def stop(self) -> bool:
        """Ask the running host job to stop; False when none trains (stop it the hard way)."""
        if self._workdir is None:
            return False
        try:
            (self._workdir / STOP_FILE).touch()
        except OSError as exc:
            log.warning("cannot ask the job to stop (%s); stopping it at once", exc)
            return False
        self.stop_requested = True
        return True


__all__ = ["OpenLink", "SessionHandle"]

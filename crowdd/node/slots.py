"""The host's TF worker slots while its session trains (elastic sessions).

One slot per worker the job wants; worker *i* of the group holds slot *i* and a newcomer
takes a free one. :class:`TrainingSlots` keeps who holds each slot and decides who can train
now: a holder that is in the session, whose TF server started and that is not away. Each
change cuts or restores the members' tunnels (:meth:`crowdd.node.tunnels.HostTunnels.cut`)
and then tells the host job through the members file (:class:`crowdd.node.roster.Roster`);
the number of free slots (nobody holds them, or their worker is gone) goes to ``on_free``
(the matchmaker's open session).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from crowdd.node.roster import Roster
from crowdd.node.session import HostSession, Member
from crowdd.node.tunnels import HostTunnels
from crowdd.platform.jobfiles import JobFileError

logger = logging.getLogger(__name__)


class TrainingSlots:
    def __init__(
        self, session: HostSession, tunnels: HostTunnels, roster: Roster, slots: list[int],
        *, say: Callable[[str], None] = lambda text: None, on_free: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.session = session
        self.tunnels = tunnels
        self.roster = roster
        self.slots = slots
        self.trained: set[int] = set()  # members that trained at some point (the model card)
        self._say = say
        self._on_free = on_free
        self._told_free: int | None = None
        for m in session.workers:  # the first members: worker i in slot i
            m.slot = m.index if m.index in slots else None

    def holders(self) -> dict[int, int | None]:
        """Slot -> the member index holding it (None: free)."""
        return {t: (h.index if (h := self.holder(t)) is not None else None) for t in self.slots}

    def holder(self, slot: int) -> Member | None:
        return next((w for w in self.session.workers if w.slot == slot), None)

    def free(self) -> list[int]:
        """Slots nobody holds, then those whose worker is gone, longest gone first (a worker
        away keeps its slot; a frozen one that thaws soon may still come back to its own)."""
        empty = [t for t in self.slots if self.holder(t) is None]
        gone = sorted((h.gone_since or 0.0, t) for t in self.slots if (h := self.holder(t)) is not None and not h.alive)
        return empty + [t for _, t in gone]

    def sync(self) -> None:
        """Cut every worker that cannot train now, then tell the job which slots can."""
        live: set[int] = set()
        for w in self.session.workers:
            if w.slot is not None and w.alive and w.started and w.away is None:
                self.tunnels.restore(w.index)
                live.add(w.slot)
                self.trained.add(w.index)
            else:
                self.tunnels.cut(w.index)
        before = self.roster.live
        try:
            changed = self.roster.set(live)
        except (OSError, JobFileError) as exc:
            self._say(f"cannot tell the job who trains ({exc})")
            changed = False
        if changed and self.roster.version > 1:
            gone, came = sorted(before - self.roster.live), sorted(self.roster.live - before)
            self._say(f"training with {len(self.roster.live)} worker(s)"
                      + (f"; slot(s) {', '.join(map(str, gone))} out" if gone else "")
                      + (f"; slot(s) {', '.join(map(str, came))} in" if came else ""))
        free = len(self.free())
        if free != self._told_free:
            self._told_free = free
            self._on_free(free)

    def started(self, m: Member) -> None:
        """``m``'s TF server (re)started: it holds nothing of this job yet."""
        if m.slot is not None:
            self.roster.started(m.slot)

    def seat(self, m: Member) -> int | None:
        """Give newcomer ``m`` a free slot (taken from a worker that is gone, if need be);
        None when there is none."""
        free = self.free()
        if not free:
            return None
        slot = free[0]
        old = self.holder(slot)
        if old is not None:
            old.slot = None  # gone: its place is the newcomer's now
        m.slot = slot
        self.tunnels.assign(slot, m.index)
        self._told_free = None  # the matchmaker counts the newcomer in flight: say it anew
        self.sync()
        return slot


__all__ = ["TrainingSlots"]

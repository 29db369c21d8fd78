"""Who trains: the members file's live slots against the slots the strategy has attached, and
the slots this run retired (their server failed) or expelled (their changes kept failing).

The coordinator's training loop owns one :class:`Trainers`. The members file (written by the
host daemon, :mod:`crowdd.job.membership`) says who is there; it attaches and detaches
slots on the :class:`~crowdd.job.elastic.ElasticCluster` to match, and says so in ``slot``,
``expel`` and ``members`` events. A retired slot comes back only when the file says it is back
(``fresh``); an expelled one only with a newcomer behind it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from crowdd.job.events import EventWriter
from crowdd.job.membership import Members

log = logging.getLogger(__name__)


class Slots(Protocol):
    """What it needs of the strategy's cluster (:class:`~crowdd.job.elastic.ElasticCluster`)."""

    def attached(self) -> set[int]: ...

    def detach(self, index: int, why: str) -> Any: ...

    def attach(self, index: int, fresh: bool) -> float: ...


class Trainers:
    """The slots of one run. ``all_gone(message)`` ends the job (it does not return).

    Set once they exist (the cluster is built with :meth:`on_retire`, so this comes
    first): ``slots``, the strategy's cluster; ``given_back(remote_value)``, which takes a
    detached slot's round out of the loop's books; ``forgive(slot)``, which clears a slot's
    record with the validator (a newcomer took it)."""

    def __init__(self, members: Members, num_workers: int, events: EventWriter,
                 all_gone: Callable[[str], None]) -> None:
        self.members = members
        self.num_workers = num_workers
        self.events = events
        self.all_gone = all_gone
        self.failed: set[int] = set()  # retired by failure; only the file brings them back
        self.expelled: dict[int, str] = {}  # only a newcomer ("fresh") takes one again
        self.seen: set[int] = set(members.live)  # slots that have trained in this run
        self.slots: Slots | None = None
        self.given_back: Callable[[Any], None] = lambda remote_value: None
        self.forgive: Callable[[int], None] = lambda slot: None

    def _slots(self) -> Slots:
        assert self.slots is not None, "no cluster yet"
        return self.slots

    def announce(self, why: str) -> None:
        self.events.emit("members", version=self.members.version, live=sorted(self.members.live),
                         training=sorted(self._slots().attached()), why=why)

    def on_retire(self, index: int, alive: int, exc: BaseException) -> None:
        """The strategy retired ``index`` (its server failed)."""
        del alive  # the slots attached now is what counts
        self.failed.add(index)
        left = len(self._slots().attached())
        self.events.emit("slot", task=index, state="left", why=f"its server failed ({type(exc).__name__})")
        if left:
            log.warning("worker %d is gone; its functions go to the %d left", index, left)
            self.announce(f"worker {index} failed")
        else:
            self.all_gone(f"every worker server is gone (the last, worker {index}: "
                          f"{type(exc).__name__}); training cannot go on")

    def apply(self, new: Members) -> None:
        """Slots that left: no more functions, their running one given up (its steps go
        back); slots that joined (or came back, or have a fresh server): attached. An
        expelled slot comes back only with a newcomer behind it (``fresh``)."""
        slots = self._slots()
        self.members = new
        for index in sorted(self.failed - new.live):
            self.failed.discard(index)  # it left after failing: a later re-add is a real one
        for index in sorted(set(self.expelled) & (new.fresh | (set(range(self.num_workers)) - new.live))):
            self.expelled.pop(index)  # a newcomer, or the slot was freed: a clean record
            self.forgive(index)
        leave = {i for i in slots.attached() if i not in new.live or i in new.fresh} - {0}
        for index in sorted(leave):
            self.given_back(slots.detach(index, f"members file version {new.version}"))
            if index not in new.live:
                self.events.emit("slot", task=index, state="left", why="not in the members file")
        for index in sorted(new.live - slots.attached()):
            self._join(index, new)
        self.announce(f"members file version {new.version}")

    def _join(self, index: int, new: Members) -> None:
        if index in self.expelled:
            return
        if index in self.failed and index not in new.fresh:
            return  # it failed and the file has not said it is back
        fresh = index in new.fresh
        try:
            spent = self._slots().attach(index, fresh)
        except Exception as exc:  # noqa: BLE001 - the slot stays out; training goes on
            log.warning("worker %d could not join: %s", index, exc)
            self.events.emit("slot", task=index, state="left", why=f"could not join: {type(exc).__name__}")
            return
        self.failed.discard(index)
        why = "a fresh server" if fresh else ("back (same server)" if index in self.seen else "joined")
        self.seen.add(index)
        self.events.emit("slot", task=index, state="joined", why=why, update_secs=round(spent, 3))

    def expel(self, slot: int, why: str) -> None:
        """Cut ``slot`` from training now; its daemon is told and frees the slot."""
        slots = self._slots()
        self.expelled[slot] = why
        log.warning("worker %d expelled: %s", slot, why)
        self.given_back(slots.detach(slot, f"expelled: {why}"))
        self.events.emit("expel", task=slot, why=why)
        if not slots.attached():
            self.all_gone(f"every worker is gone (the last, worker {slot}, expelled: {why}); "
                          "training cannot go on")
        self.announce(f"worker {slot} expelled")

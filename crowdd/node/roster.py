"""Who trains right now: the host daemon's view of its TF worker slots, told to its job.

Every worker member of the group owns one TF worker slot (its task index in the cluster spec;
slot 0 is the host's own worker, which always trains). A slot is *live* while its member is
in the session, its TF server has started and it is not away (its volunteer's machine busy).
:class:`Roster` keeps that set and writes it to the host job's members file
(:data:`crowdd.job.MEMBERS_FILE`, atomically) whenever it changes; the job retires a slot that
leaves the set and brings back one that enters it (``fresh``: its server was started anew and
holds nothing of this job). The daemon cuts a slot's tunnels before it leaves the set, so the
job's calls to it fail at once instead of hanging on a frozen machine.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from crowdd.job import MEMBERS_FILE
from crowdd.platform import jobfiles

logger = logging.getLogger(__name__)


class Roster:
    """The live slots of one session and the file that tells the host job."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.path = workdir / MEMBERS_FILE
        self.version = 0
        self.live: frozenset[int] = frozenset()
        self.ever: set[int] = set()  # every slot that trained at some point (the model card)
        self._fresh: set[int] = set()  # slots (re)started since the job last saw them live

    def started(self, slot: int) -> None:
        """Slot ``slot``'s TF server was (re)started: the next time it is live it is fresh."""
        self._fresh.add(slot)

    def set(self, live: set[int] | frozenset[int]) -> bool:
        """Make ``live`` the live set; write the file if it changed (True then)."""
        live = frozenset(s for s in live if s > 0)
        if live == self.live and self.version:
            return False
        fresh = sorted(s for s in self._fresh if s in live)
        self.version += 1
        self._write({"version": self.version, "live": sorted(live), "fresh": fresh})
        self._fresh.difference_update(fresh)
        left, joined = sorted(self.live - live), sorted(live - self.live)
        self.live = live
        self.ever |= live
        logger.info("training slots: %s (joined %s, left %s, fresh %s)", sorted(live), joined, left, fresh)
        return True

    def _write(self, doc: dict[str, object]) -> None:
        # the job's directory, which graphs can write: never through a link planted there
        jobfiles.write(self.workdir, MEMBERS_FILE, json.dumps(doc).encode())


__all__ = ["Roster"]

"""The members file: which worker slots have a member behind them now (TF-free).

The host daemon writes :data:`crowdd.job.MEMBERS_FILE` in the host job's working directory,
atomically (a temporary file, then ``os.replace``)::

    {"version": 7, "live": [1, 3], "fresh": [3]}

``live``: the worker task indices (into the spec's ``cluster.worker``) that have a TF server
behind them now; worker 0 (the host's own) is always live. ``fresh``: live slots whose server
was (re)started since the job last saw them live (it holds nothing of this job). The job polls
the file (:class:`MembersWatcher`); a garbled file is logged and ignored: the last good one
stays. See ``docs/job-spec.md``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

POLL_SECS = 0.5
MAX_BYTES = 64 * 1024


class MembersError(ValueError):
    """A members file that cannot be used (the reason in the message)."""


@dataclass(frozen=True)
class Members:
    """One version of the members file."""

    version: int
    live: frozenset[int]
    fresh: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def everyone(cls, num_slots: int) -> Members:
        """No members file: every slot is live (a job started without elastic membership)."""
        return cls(-1, frozenset(range(num_slots)))


def _indices(value: Any, name: str, num_slots: int) -> frozenset[int]:
    if not isinstance(value, list):
        raise MembersError(f"{name} must be a list of worker indices")
    out = set()
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < num_slots:
            raise MembersError(f"{name} holds {item!r}, not a worker index 0..{num_slots - 1}")
        out.add(item)
    return frozenset(out)


def parse_members(obj: Any, num_slots: int) -> Members:
    """Check one decoded members file; raise :class:`MembersError` if it cannot be used."""
    if not isinstance(obj, Mapping):
        raise MembersError("must be a JSON object")
    unknown = sorted(set(obj) - {"version", "live", "fresh"})
    if unknown:
        raise MembersError(f"unknown field {unknown[0]!r}")
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise MembersError(f"version must be an integer >= 0, got {version!r}")
    live = _indices(obj.get("live"), "live", num_slots) | {0}
    fresh = _indices(obj.get("fresh", []), "fresh", num_slots)
    if not fresh <= live:
        raise MembersError(f"fresh slot(s) {sorted(fresh - live)} are not live")
    return Members(version, live, fresh - {0})


def read_members(path: Path, num_slots: int) -> Members:
    """Read and check the file; OSError if it cannot be read, MembersError if it is bad."""
    with open(path, "rb") as f:
        raw = f.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise MembersError(f"larger than {MAX_BYTES} bytes")
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise MembersError(f"not JSON: {exc}") from None
    return parse_members(obj, num_slots)


class MembersWatcher:
    """Polls the members file; :meth:`poll` returns a newer good version, else None.

    A file that is missing, unreadable or garbled changes nothing (the last good version
    stays); each distinct problem is logged once. A version that is not newer than the last
    good one is ignored.
    """

    def __init__(self, path: Path, num_slots: int) -> None:
        self.path = path
        self.num_slots = num_slots
        self.current: Members | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._complaint = ""

    def _complain(self, message: str) -> None:
        if message != self._complaint:
            self._complaint = message
            log.warning("members file %s ignored: %s", self.path, message)

    def poll(self) -> Members | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._complain(str(exc))
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            members = read_members(self.path, self.num_slots)
        except (OSError, MembersError) as exc:
            self._complain(str(exc))
            return None
        self._complaint = ""
        if self.current is not None and members.version <= self.current.version:
            if members != self.current:
                self._complain(f"version {members.version} is not newer than {self.current.version}")
            return None
        self.current = members
        return members


__all__ = ["POLL_SECS", "Members", "MembersError", "MembersWatcher", "parse_members", "read_members"]

"""Who a host expelled from its group: the matchmaker never places them together again.

Pure and in memory (a restarted matchmaker forgets, and a host can then report only groups
placed since). :class:`Bans` remembers the groups the matchmaker placed (the host's
fingerprint and group id → the workers it sent there, the most recent ``max_placed`` workers
in all), decides whether a host's ``expel`` report stands (:meth:`Bans.expel`: only that
group's host, naming a worker placed in it) and keeps the banned (host, worker) pairs, the
oldest forgotten beyond ``max_bans``. :class:`crowdd.matchmaker.Grouper` asks
:meth:`Bans.of` before placing a worker with a host.
"""

from __future__ import annotations

from collections.abc import Iterable

from crowdd import wire

#: Banned (host, worker) pairs kept; the oldest is forgotten beyond this.
MAX_BANS = 100_000
#: Placed workers remembered (over all groups) so that their host can report them.
MAX_PLACED = 100_000

_NONE: frozenset[str] = frozenset()


class Bans:
    """The groups placed (so that their host can report an expelled member) and the banned pairs."""

    def __init__(self, max_bans: int = MAX_BANS, max_placed: int = MAX_PLACED) -> None:
        if max_bans < 1 or max_placed < 1:
            raise ValueError("max_bans and max_placed must be >= 1")
        self.max_bans = max_bans
        self.max_placed = max_placed
        self._order: dict[tuple[str, str], None] = {}  # (host, worker), oldest first
        self._by_host: dict[str, set[str]] = {}
        self._placed: dict[tuple[str, str], set[str]] = {}  # (host, group id) → workers, oldest first
        self._placed_count = 0

    def __len__(self) -> int:
        return len(self._order)

    def of(self, host: str) -> frozenset[str] | set[str]:
        """The workers never to place with ``host`` (a fingerprint); read only."""
        return self._by_host.get(host, _NONE)

    def banned(self, host: str, worker: str) -> bool:
        return worker in self.of(host)

    def ban(self, host: str, worker: str) -> None:
        """Never place ``worker`` with ``host`` again (while this pair is among the newest ``max_bans``)."""
        pair = (host, worker)
        self._order.pop(pair, None)
        self._order[pair] = None
        self._by_host.setdefault(host, set()).add(worker)
        while len(self._order) > self.max_bans:
            old_host, old_worker = next(iter(self._order))
            del self._order[(old_host, old_worker)]
            workers = self._by_host[old_host]
            workers.discard(old_worker)
            if not workers:
                del self._by_host[old_host]

    def placed(self, host: str, group_id: str, workers: Iterable[str]) -> None:
        """The matchmaker sent ``workers`` into ``host``'s group ``group_id`` (a new group, or
        newcomers to its open session)."""
        key = (host, group_id)
        members = self._placed.pop(key, set())
        before = len(members)
        members.update(workers)
        self._placed[key] = members  # now the newest
        self._placed_count += len(members) - before
        while self._placed_count > self.max_placed and len(self._placed) > 1:
            oldest = next(iter(self._placed))
            self._placed_count -= len(self._placed.pop(oldest))

    def expel(self, host: str, group_id: str, member: str) -> None:
        """``host`` (the reporter's proven fingerprint) expelled ``member`` from ``group_id``:
        ban the pair. Raises :class:`wire.WireError` when that is not ``host``'s group as
        placed here (``unauthorized``, ``group_id``) or ``member`` was not placed in it
        (``bad_field``, ``member``)."""
        members = self._placed.get((host, group_id))
        if members is None:
            raise wire.WireError(wire.ErrorCode.UNAUTHORIZED, f"this matchmaker placed no group {group_id} with "
                                 "you as its host (or no longer remembers it)", field="group_id")
        if member not in members:
            raise wire.WireError(wire.ErrorCode.BAD_FIELD, f"{member} is not a worker this matchmaker placed in "
                                 f"group {group_id}", field="member")
        self.ban(host, member)


__all__ = ["MAX_BANS", "MAX_PLACED", "Bans"]

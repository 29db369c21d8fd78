"""The matchmaker's decisions, pure and tested directly (no I/O).

:func:`admit` decides whether a new connection fits the limits; :class:`Grouper` holds the FIFO
queues and the open sessions (running ones with free places), and :meth:`Grouper.form` decides
which waiting workers join an open session and which groups to form (never a worker with a
host that expelled it: :class:`crowdd.matchmaker.bans.Bans`); :func:`group_frames` and
:func:`join_frames` build what each member receives. Whether a hello is acceptable is
:func:`crowdd.protocol.matchmaker.check_hello`'s call.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass, field
from typing import Any

from crowdd import wire
from crowdd.config import MatchmakerConfig
from crowdd.hyperparams import GroupSettings, Job
from crowdd.matchmaker.bans import Bans
from crowdd.plan import PlanMember
from crowdd.protocol.matchmaker import HOST, MAX_MEMBERS, Hello, Slots, make_group, make_join, make_joined


def source(ip: str) -> str:
    """Whom a connection counts against in the per-source limits: its IPv4 address, or the /64
    of its IPv6 address (one home or one host is handed a whole /64: counting each address
    would let one of them fill ``max_clients`` for everyone). An IPv4-mapped IPv6 address
    counts as its IPv4 address; anything else unparsable counts as itself."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{addr}/64", strict=False))
    return str(addr)


def admit(total: int, from_ip: int, cfg: MatchmakerConfig) -> wire.WireError | None:
    """Whether one more connection fits the limits (given the open ones); a busy error if not."""
    if total >= cfg.max_clients:
        return wire.WireError(wire.ErrorCode.BUSY, f"the matchmaker is full ({cfg.max_clients} clients); try again later")
    if from_ip >= cfg.max_per_ip:
        return wire.WireError(wire.ErrorCode.BUSY, f"too many connections from your address (limit {cfg.max_per_ip})")
    return None


# --------------------------------------------------------------------------- queues and grouping (pure)


@dataclass(frozen=True, slots=True)
class Waiter:
    """One queued client."""

    id: int
    hello: Hello
    joined: float

    @property
    def role(self) -> str:
        return self.hello.role


@dataclass(frozen=True, slots=True)
class Group:
    host: Waiter
    workers: tuple[Waiter, ...]

    @property
    def members(self) -> tuple[Waiter, ...]:
        return (self.host, *self.workers)


@dataclass
class OpenGroup:
    """A running session held open by its host's connection (``host``): its members so far
    (the host first, gone ones too, then each newcomer sent to it), how many more it takes
    now, and how many ``joined`` frames went to the host on this connection."""

    host: Waiter
    group_id: str
    token: str
    members: list[PlanMember]
    free: int
    sent: int = 0
    fingerprints: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.fingerprints.update(m.fingerprint for m in self.members)

    def has(self, fingerprint: str) -> bool:
        return fingerprint in self.fingerprints

    def append(self, member: PlanMember) -> None:
        self.members.append(member)
        self.fingerprints.add(member.fingerprint)
        self.free -= 1
        self.sent += 1


@dataclass(frozen=True, slots=True)
class Join:
    """A waiting worker sent into an open session as its member ``member.index``; ``members``
    are the session's members with the newcomer last."""

    host: Waiter
    worker: Waiter
    group_id: str
    token: str
    members: tuple[PlanMember, ...]

    @property
    def member(self) -> PlanMember:
        return self.members[-1]


def matches(host: Hello, worker: Hello) -> bool:
    """Host targeting: each side's ``want_tag`` (if any) must equal the other's ``tag``."""
    return (not worker.want_tag or worker.want_tag == host.tag) and (not host.want_tag or host.want_tag == worker.tag)


@dataclass
class Grouper:
    """The two FIFO queues (insertion-ordered dicts), the open sessions (oldest first), the
    pairs never to place together (``bans``) and the grouping rule."""

    hosts: dict[int, Waiter] = field(default_factory=dict)
    workers: dict[int, Waiter] = field(default_factory=dict)
    open: dict[int, OpenGroup] = field(default_factory=dict)
    bans: Bans = field(default_factory=Bans)

    def add(self, waiter: Waiter) -> int:
        """Queue a client; return its 1-based position in its role's queue."""
        if waiter.hello.open is not None:
            raise ValueError("an open session is not queued: use open_session()")
        queue = self._queue(waiter.role)
        if waiter.id in self:
            raise ValueError(f"client {waiter.id} is already queued")
        queue[waiter.id] = waiter
        return len(queue)

    def open_session(self, waiter: Waiter) -> tuple[int, Waiter | None]:
        """Hold a running session open (its host's hello has ``open``); return its 1-based place
        among the open sessions and the connection it replaces: the same host's older one for
        this session (a host that reconnects before its old connection is noticed gone).
        Another host's session with the same id is refused (``open.group_id``)."""
        session = waiter.hello.open
        if session is None:
            raise ValueError("not an open session: use add()")
        if waiter.id in self:
            raise ValueError(f"client {waiter.id} is already queued")
        replaced = None
        for cid, other in self.open.items():
            if other.group_id != session.group_id:
                continue
            if other.host.hello.fingerprint != waiter.hello.fingerprint:
                raise wire.WireError(wire.ErrorCode.BAD_FIELD, f"session {session.group_id} is held open by another host",
                                     field="open.group_id")
            replaced = other.host
            del self.open[cid]
            break
        self.open[waiter.id] = OpenGroup(waiter, session.group_id, session.token, list(session.members), session.free)
        return len(self.open), replaced

    def set_free(self, client_id: int, slots: Slots) -> OpenGroup:
        """An open session's host counted ``slots.free`` free places having seen ``slots.seen``
        of the newcomers sent to it: the ones still in flight are taken off. Raises
        :class:`wire.WireError` (``seen``, ``free``) when that cannot be right."""
        session = self.open.get(client_id)
        if session is None:
            raise ValueError(f"client {client_id} holds no session open")
        if slots.seen > session.sent:
            raise wire.WireError(wire.ErrorCode.BAD_FIELD, f"field 'seen': only {session.sent} newcomer(s) were sent "
                                 f"on this connection, not {slots.seen}", field="seen")
        free = max(0, slots.free - (session.sent - slots.seen))
        job = session.host.hello.job
        if job is not None and slots.free > job.workers:
            raise wire.WireError(wire.ErrorCode.BAD_FIELD, f"field 'free': the job has {job.workers} worker "
                                 f"place(s), not {slots.free}", field="free")
        if len(session.members) + free > MAX_MEMBERS:
            raise wire.WireError(wire.ErrorCode.BAD_FIELD, f"a session has at most {MAX_MEMBERS} members: "
                                 f"{len(session.members)} + {free} free is too many", field="free")
        session.free = free
        return session

    def remove(self, client_id: int) -> Waiter | None:
        session = self.open.pop(client_id, None)
        if session is not None:
            return session.host
        return self.hosts.pop(client_id, None) or self.workers.pop(client_id, None)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self.hosts or client_id in self.workers or client_id in self.open

    def __len__(self) -> int:
        return len(self.hosts) + len(self.workers) + len(self.open)

    def _queue(self, role: str) -> dict[int, Waiter]:
        return self.hosts if role == HOST else self.workers

    def positions(self) -> dict[int, int]:
        """Every queued client's 1-based position in its role's queue, and every open
        session's place among them."""
        out = {cid: i for i, cid in enumerate(self.hosts, 1)}
        out.update({cid: i for i, cid in enumerate(self.workers, 1)})
        out.update({cid: i for i, cid in enumerate(self.open, 1)})
        return out

    def form(self, now: float) -> tuple[list[Join], list[Group]]:
        """Fill the open sessions (:meth:`fill_open`), then form new groups (:meth:`form_groups`)."""
        joins = self.fill_open()
        return joins, self.form_groups(now)

    def fill_open(self) -> list[Join]:
        """Send waiting workers into open sessions with free places, oldest session first,
        each taking the oldest matching workers (tags both ways) that are not already among
        its members nor banned with its host; take them off the queue. Each newcomer gets the
        session's next index."""
        joins: list[Join] = []
        for session in self.open.values():
            if session.free <= 0:
                continue
            host = session.host.hello
            banned = self.bans.of(host.fingerprint)
            taken: list[Waiter] = []
            for w in self.workers.values():
                if matches(host, w.hello) and not session.has(w.hello.fingerprint) and w.hello.fingerprint not in banned:
                    taken.append(w)
                    if len(taken) == session.free:
                        break
            for w in taken:
                del self.workers[w.id]
                session.append(w.hello.plan_member(len(session.members)))
                joins.append(Join(session.host, w, session.group_id, session.token, tuple(session.members)))
        return joins

    def form_groups(self, now: float) -> list[Group]:
        """Form every group possible now (oldest host first) and take its members off the queues."""
        groups: list[Group] = []
        for host in list(self.hosts.values()):
            job = host.hello.job
            if job is None:  # pragma: no cover - check_hello guarantees a host has a job
                continue
            taken = self._take(host, job, now)
            if taken is None:
                continue
            del self.hosts[host.id]
            for w in taken:
                del self.workers[w.id]
            groups.append(Group(host, tuple(taken)))
        return groups

    def _take(self, host: Waiter, job: Job, now: float) -> list[Waiter] | None:
        found: list[Waiter] = []
        if job.workers:
            banned = self.bans.of(host.hello.fingerprint)
            for w in self.workers.values():
                if matches(host.hello, w.hello) and w.hello.fingerprint not in banned:
                    found.append(w)
                    if len(found) == job.workers:
                        return found
        else:
            return found
        if now - host.joined >= job.wait and len(found) >= job.min_workers:
            return found
        return None

    def next_deadline(self, now: float) -> float | None:
        """When some host's wait runs out next (and its minimum may then be enough)."""
        deadlines = [
            h.joined + h.hello.job.wait for h in self.hosts.values() if h.hello.job is not None and h.joined + h.hello.job.wait > now
        ]
        return min(deadlines) if deadlines else None


def group_frames(group: Group, group_id: str, token: str) -> dict[int, dict[str, Any]]:
    """The group frame for each member (by client id): identical except for ``index``."""
    host = group.host.hello
    hellos = [m.hello for m in group.members]
    job = host.job if host.job is not None else Job()
    settings = host.settings if host.settings is not None else GroupSettings()
    return {
        m.id: make_group(group_id, token, i, hellos, job, host.dataset or {}, settings)
        for i, m in enumerate(group.members)
    }


def join_frames(join: Join) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a join sends: the newcomer's ``group`` frame (``join: true``) and the open
    session's host's ``joined`` frame."""
    host = join.host.hello
    job = host.job if host.job is not None else Job()
    settings = host.settings if host.settings is not None else GroupSettings()
    newcomer = make_join(join.group_id, join.token, join.members, job, host.dataset or {}, settings)
    return newcomer, make_joined(join.member)


def new_group_id() -> str:
    return secrets.token_hex(8)


def new_token() -> str:
    return secrets.token_hex(32)


__all__ = ["Group", "Grouper", "Join", "OpenGroup", "Waiter", "admit", "group_frames", "join_frames", "matches", "source",
           "new_group_id", "new_token"]

"""The central matchmaker: queues waiting hosts and workers and forms groups (docs/protocol.md).

State and decisions are pure and tested directly: :func:`check_hello` decides whether a hello
is acceptable, :func:`admit` whether a new connection fits the limits, :class:`Grouper` holds
the FIFO queues and the open sessions (running ones with free places), :meth:`Grouper.form`
decides which waiting workers join an open session and which groups to form (never a worker
with a host that expelled it: :class:`crowdd.matchmaker_bans.Bans`), and
:func:`group_frames` / :func:`join_frames` build what each member receives. :class:`Matchmaker` is the asyncio I/O
around them: one lightweight :class:`asyncio.Protocol` per connection (no task, no stream
objects, so 10,000 waiting clients stay cheap), fed through :class:`wire.FrameDecoder`, and one
sweep that enforces every timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import gc
import logging
import secrets
import signal
import ssl
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from asyncio import sslproto
from pathlib import Path
from typing import Any

from crowdd import wire
from crowdd.aio import spawn_tracked
from crowdd.errors import CrowddError, InputError
from crowdd.identity import Identity, fingerprint_of
from crowdd.tls import server_context
from crowdd.config import MatchmakerConfig, parse_hostport
from crowdd.hyperparams import GroupSettings, Job
from crowdd.matchmaker_bans import Bans
from crowdd.plan import PlanMember
from crowdd.protocol.matchmaker import (
    HOST,
    MAX_MEMBERS,
    Expel,
    Hello,
    Slots,
    check_expel,
    check_hello,
    is_public,
    check_slots,
    make_expelled,
    make_group,
    make_join,
    make_joined,
    make_wait,
)

logger = logging.getLogger(__name__)

WAIT_INTERVAL = 1.0
MAX_UNSENT = 1 << 20
#: New connections between two :meth:`Matchmaker._settle` passes.
SETTLE_EVERY = 256
#: Closed connections (at least) between two full passes that reclaim frozen garbage.
RECLAIM_MIN = 1024
#: TLS handshakes run at once; later connections wait their turn (reading paused, no TLS state).
MAX_HANDSHAKES = 256


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


# --------------------------------------------------------------------------- I/O


class _Arrival(asyncio.Protocol):
    """A raw connection waiting for a handshake slot: nothing is read and no TLS state is
    made until :meth:`Matchmaker._next_handshake` hands its transport to a :class:`_TLS`."""

    __slots__ = ("arrived", "server", "transport")

    def __init__(self, server: Matchmaker) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.arrived = server.now()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.pause_reading()  # before asyncio starts reading: the handshake reads first
        self.server._arrived(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None  # gone while waiting; skipped when its turn comes
        self.server._closed += 1


class _TLS(sslproto.SSLProtocol):
    """asyncio's TLS layer for one client, with a 1 KiB read buffer instead of 256 KiB (a
    waiting client sends a hello of a kilobyte or two, then heartbeats of a few bytes, and
    10,000 of them must stay cheap: OpenSSL's own state is already ~18 KiB a connection); it
    remembers the peer's address so that a failed handshake can be logged with it."""

    max_size = 1024
    peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        super().connection_made(transport)  # type: ignore[no-untyped-call]


class _Conn(asyncio.Protocol):
    """One client connection, driven by the :class:`Matchmaker`."""

    __slots__ = (
        "_linger",
        "connected_at",
        "decoder",
        "id",
        "ip",
        "last_rx",
        "opens",
        "partial_since",
        "pending",
        "position",
        "private_ok",
        "sent_position",
        "server",
        "state",
        "transport",
    )

    def __init__(self, server: Matchmaker) -> None:
        self.server = server
        self.id = server._next_id()
        self.transport: asyncio.Transport | None = None
        self.ip = ""
        self.private_ok = True
        self.state = "new"  # new → waiting → closing (last frame sent, draining) → done
        self.decoder = wire.FrameDecoder(max_size=server.cfg.max_frame, max_blob=0)
        now = server.now()
        self.connected_at = now
        self.last_rx = now
        self.partial_since: float | None = None
        self.opens = False  # its hello holds a running session open
        self.pending: Slots | None = None  # a slots frame that came while its reachability was checked
        self.position = 0
        self.sent_position = 0
        self._linger: asyncio.TimerHandle | None = None

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # over TLS this is after the handshake: the hello's read_timeout starts now
        self.connected_at = self.last_rx = self.server.now()
        self.transport = typing.cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        local = transport.get_extra_info("sockname")
        # reached at a loopback or private address (a LAN, a test): members may have such addresses
        self.private_ok = not is_public(str(local[0])) if isinstance(local, tuple) and local else True
        self.server._connected(self)

    def data_received(self, data: bytes) -> None:
        if self.state in ("closing", "done"):
            return  # after our last frame, input is read and discarded until the peer closes
        now = self.server.now()
        self.last_rx = now
        try:
            frames = self.decoder.feed(data)
            for frame, _blob in frames:
                if self.state in ("closing", "done"):
                    return
                self._handle(frame)
        except wire.WireError as exc:
            self.fail(exc)
            return
        except Exception:
            logger.exception("matchmaker: internal error on a connection from %s", self.ip)
            self.fail(wire.WireError(wire.ErrorCode.INTERNAL, "internal error"))
            return
        if self.decoder.buffered == 0:
            self.partial_since = None
        elif frames or self.partial_since is None:
            self.partial_since = now

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = "done"
        if self._linger is not None:
            self._linger.cancel()
        self.server._disconnected(self)

    # protocol
    def _handle(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if "blob" in frame:
            raise wire.WireError(wire.ErrorCode.BAD_FRAME, "the matchmaker accepts no blobs")
        if kind not in ("hello", "heartbeat", "slots", "expel"):
            raise wire.WireError(wire.ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind!r}")
        if kind == "expel":
            if self.state != "new":
                raise wire.WireError(wire.ErrorCode.BAD_FRAME, "an expel report is the only frame of its connection")
            self.server._expel(self, check_expel(frame))
        elif self.state == "new":
            hello = check_hello(frame, self.ip, trust_advertised=self.server.cfg.trust_advertised,
                                private_ok=self.private_ok)
            self.opens = hello.open is not None
            if self.server.cfg.check_reachable:
                self.state = "checking"  # queued once the connect-back has answered
                self.server._check_reachable(self, hello)
            else:
                self.state = "waiting"
                self.server._join(self, hello)
        elif kind == "hello":
            raise wire.WireError(wire.ErrorCode.BAD_FRAME, "hello was already sent on this connection")
        elif kind == "slots":
            if not self.opens:
                raise wire.WireError(wire.ErrorCode.BAD_FRAME, "only a host holding its session open sends slots")
            slots = check_slots(frame)
            if self.state == "checking":
                self.pending = slots  # applied once it is open
            else:
                self.server._slots(self, slots)
        elif self.state != "checking":
            self.send_wait()

    def send(self, frame: Mapping[str, Any]) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(wire.encode(frame))
        if t.get_write_buffer_size() > MAX_UNSENT:
            logger.info("matchmaker: dropping %s (%s): it does not read", self.id, self.ip)
            self.drop()

    def send_wait(self) -> None:
        g = self.server.grouper
        self.sent_position = self.position
        self.send(make_wait(self.position, len(g.hosts), len(g.workers)))

    def finish(self, frame: Mapping[str, Any]) -> None:
        """Send a last frame, then close gracefully.

        Closing a socket with unread input (say, a heartbeat in flight) makes the kernel send
        a reset, which can destroy the last frame before the peer reads it. So: send, shut
        down our side (FIN after the frame; over TLS, which asyncio cannot half-close, nothing),
        discard input until the peer closes, and abort only if it has not closed within
        ``read_timeout``.
        """
        self.send(frame)
        self.server._leave(self)
        t = self.transport
        if self.state in ("closing", "done") or t is None or t.is_closing():
            return  # already on its way out (or dropped because it does not read)
        self.state = "closing"
        self.partial_since = None
        if self.server._loop is not None:
            self._linger = self.server._loop.call_later(self.server.cfg.read_timeout, t.abort)
        if t.can_write_eof():
            t.write_eof()
        # asyncio's TLS cannot half-close: there the frame simply stays the last one sent,
        # and the connection ends when the peer closes (or the linger above aborts it)

    def fail(self, err: wire.WireError) -> None:
        logger.info("matchmaker: client %s (%s): %s", self.id, self.ip, err)
        self.finish(err.to_frame())

    def drop(self) -> None:
        self.server._leave(self)
        self.state = "done"
        if self.transport is not None:
            self.transport.abort()


class Matchmaker:
    """The asyncio server around :class:`Grouper`. ``await start(host, port)``, then ``close()``."""

    def __init__(self, cfg: MatchmakerConfig, *, wait_interval: float = WAIT_INTERVAL) -> None:
        self.cfg = cfg
        self.wait_interval = wait_interval
        self.grouper = Grouper()
        self.conns: dict[int, _Conn] = {}
        self.per_ip: dict[str, int] = {}
        self.groups_formed = 0
        self.joins = 0
        self.expelled = 0
        self.dropped = 0
        self._ids = 0
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._form_scheduled = False
        self._deadline: asyncio.TimerHandle | None = None
        self._positions_dirty = False
        self._checks: set[asyncio.Task[None]] = set()
        self.tls: ssl.SSLContext | None = None
        self.tls_refused = 0
        self._unsettled = 0
        self._closed = 0
        self._arrivals: collections.deque[_Arrival] = collections.deque()
        self._handshaking = 0

    def now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the matchmaker is not listening")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        """Listen (TLS with ``tls``, which ``crowdd matchmaker`` always gives)."""
        self._loop = asyncio.get_running_loop()
        self.tls = tls
        self._server = await self._loop.create_server(
            self._protocol, host or None, port, backlog=4096, reuse_address=True,
        )
        sweep = max(0.05, min(1.0, self.cfg.read_timeout / 4, self.cfg.heartbeat_timeout / 4))
        self._tasks = [
            asyncio.create_task(self._every(sweep, self._sweep), name="matchmaker-sweep"),
            asyncio.create_task(self._every(self.wait_interval, self._notify_positions), name="matchmaker-wait"),
            asyncio.create_task(self._every(self.cfg.status_interval, self._status), name="matchmaker-status"),
        ]
        logger.info("matchmaker listening on %s:%d", *self.address)

    async def close(self) -> None:
        for t in [*self._tasks, *self._checks]:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        if self._deadline is not None:
            self._deadline.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns.values()):
            conn.drop()
        while self._arrivals:
            waiting = self._arrivals.popleft().transport
            if waiting is not None:
                waiting.abort()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
        self._server = None

    def _protocol(self) -> asyncio.BaseProtocol:
        """A new connection: plain, or (with TLS) an :class:`_Arrival` that waits for one
        of ``MAX_HANDSHAKES`` handshake slots, so that a burst of arrivals costs a socket
        each, not a TLS state each, and the handshakes run as fast as the CPU allows."""
        return _Conn(self) if self.tls is None else _Arrival(self)

    def _arrived(self, arrival: _Arrival) -> None:
        self._arrivals.append(arrival)
        self._next_handshake()

    def _next_handshake(self) -> None:
        """Start waiting handshakes while slots are free. The layer's :class:`_Conn` sees
        only the decrypted stream, from a completed handshake on; a failed one is logged."""
        loop, tls = self._loop, self.tls
        while self._handshaking < MAX_HANDSHAKES and self._arrivals and loop is not None and tls is not None:
            arrival = self._arrivals.popleft()
            t = arrival.transport
            if t is None or t.is_closing():
                continue
            conn = _Conn(self)
            done = loop.create_future()
            layer = _TLS(loop, conn, tls, done, server_side=True,
                         ssl_handshake_timeout=self.cfg.read_timeout)  # type: ignore[arg-type]  # typeshed: int
            done.add_done_callback(functools.partial(self._handshaken, layer, conn))
            self._handshaking += 1
            t.set_protocol(layer)  # what loop.start_tls does, without a task per connection
            layer.connection_made(t)
            t.resume_reading()

    def _expire_arrivals(self, now: float) -> None:
        """Close connections that waited ``read_timeout`` for a handshake slot."""
        while self._arrivals and now - self._arrivals[0].arrived > self.cfg.read_timeout:
            t = self._arrivals.popleft().transport
            if t is not None:
                self.dropped += 1
                t.abort()

    def _handshaken(self, layer: _TLS, conn: _Conn, done: asyncio.Future[None]) -> None:
        self._handshaking -= 1
        self._next_handshake()
        exc = None if done.cancelled() else done.exception()
        if exc is None and conn.transport is not None:
            return  # the connection is the _Conn's now
        self._closed += 1
        if exc is None:
            return  # the peer left before finishing the handshake
        self.tls_refused += 1
        if isinstance(exc, ssl.SSLError) and exc.reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"):
            why = "it does not speak TLS (a plaintext client, an older crowdd, or not crowdd at all)"
        elif isinstance(exc, ssl.SSLError) and exc.reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"):
            why = "it does not offer TLS 1.3"
        elif isinstance(exc, ConnectionAbortedError):
            why = f"no TLS handshake within {self.cfg.read_timeout} s"
        else:
            why = "the TLS handshake failed"
        logger.info("matchmaker: refusing a connection from %s: %s (%s)", layer.peer, why, exc)

    def stats(self) -> dict[str, int]:
        return {
            "hosts": len(self.grouper.hosts),
            "workers": len(self.grouper.workers),
            "open": len(self.grouper.open),
            "connections": len(self.conns),
            "groups": self.groups_formed,
            "joins": self.joins,
            "expelled": self.expelled,
            "banned": len(self.grouper.bans),
            "dropped": self.dropped,
            "tls_refused": self.tls_refused,
            "handshaking": self._handshaking,
            "arrivals": len(self._arrivals),
        }

    # connection bookkeeping
    def _connected(self, conn: _Conn) -> None:
        err = admit(len(self.conns), self.per_ip.get(conn.ip, 0), self.cfg)
        if err is not None:
            logger.info("matchmaker: refusing %s: %s", conn.ip, err.message)
            conn.finish(err.to_frame())
            return
        self.conns[conn.id] = conn
        self.per_ip[conn.ip] = self.per_ip.get(conn.ip, 0) + 1
        self._unsettled += 1

    def _disconnected(self, conn: _Conn) -> None:
        self._leave(conn)
        self._closed += 1
        if self.conns.pop(conn.id, None) is not None:
            left = self.per_ip.get(conn.ip, 1) - 1
            if left > 0:
                self.per_ip[conn.ip] = left
            else:
                self.per_ip.pop(conn.ip, None)

    def _leave(self, conn: _Conn) -> None:
        if self.grouper.remove(conn.id) is not None:
            self._positions_dirty = True

    def _check_reachable(self, conn: _Conn, hello: Hello) -> None:
        spawn_tracked(self._checks, self._connect_back(conn, hello))

    async def _connect_back(self, conn: _Conn, hello: Hello) -> None:
        """Whether this member's data port accepts a connection from here (it is not behind a
        NAT, or its ports are forwarded); then queue it, or refuse an unreachable host."""
        port = int(hello.ports["data"])
        ok = await connects(hello.address, port, self.cfg.reach_timeout)
        if conn.state != "checking":
            return  # it left meanwhile
        if not ok and hello.role == HOST:
            conn.fail(wire.WireError(wire.ErrorCode.UNREACHABLE, unreachable_host_message(hello)))
            return
        if not ok:
            logger.info("matchmaker: worker %r at %s is not reachable (NAT?): it will fetch as a leaf",
                        hello.name, hello.address)
        conn.state = "waiting"
        self._join(conn, dataclasses.replace(hello, reachable=ok))

    def _join(self, conn: _Conn, hello: Hello) -> None:
        waiter = Waiter(conn.id, hello, self.now())
        if hello.open is None:
            conn.position = self.grouper.add(waiter)
            logger.debug("matchmaker: %s %r (%s) queued at %d", hello.role, hello.name, hello.address, conn.position)
        else:
            try:
                conn.position, replaced = self.grouper.open_session(waiter)
            except wire.WireError as exc:
                conn.fail(exc)
                return
            if replaced is not None:
                stale = self.conns.get(replaced.id)
                logger.info("matchmaker: host %r reopened session %s; closing its older connection",
                            hello.name, hello.open.group_id)
                if stale is not None:
                    stale.drop()
            logger.info("matchmaker: host %r (%s) holds session %s open: %d member(s), %d free",
                        hello.name, hello.address, hello.open.group_id, len(hello.open.members), hello.open.free)
            self._positions_dirty = True
            if conn.pending is not None:
                slots, conn.pending = conn.pending, None
                self._slots(conn, slots)
                if conn.state != "waiting":
                    return
        conn.send_wait()
        self._schedule_form()

    def _schedule_form(self) -> None:
        if not self._form_scheduled and self._loop is not None:
            self._form_scheduled = True
            self._loop.call_soon(self._form)

    def _slots(self, conn: _Conn, slots: Slots) -> None:
        """An open session's host says how many places it has free now."""
        try:
            session = self.grouper.set_free(conn.id, slots)
        except wire.WireError as exc:
            conn.fail(exc)
            return
        logger.debug("matchmaker: session %s has %d free place(s)", session.group_id, session.free)
        if session.free > 0:
            self._schedule_form()

    def _expel(self, conn: _Conn, report: Expel) -> None:
        """A host (its signature checked) reports that it expelled a member of its group."""
        try:
            self.grouper.bans.expel(report.host, report.group_id, report.member)
        except wire.WireError as exc:
            conn.fail(exc)
            return
        self.expelled += 1
        logger.info("matchmaker: host %s expelled %s from group %s (%r): never placed together again",
                    report.host, report.member, report.group_id, report.reason)
        conn.finish(make_expelled(report.group_id, report.member))

    # grouping
    def _form(self) -> None:
        self._form_scheduled = False
        now = self.now()
        joins, groups = self.grouper.form(now)
        for join in joins:
            self._positions_dirty = True
            self._send_join(join)
        for group in groups:
            self._positions_dirty = True
            self._send_group(group)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        nxt = self.grouper.next_deadline(now)
        if nxt is not None and self._loop is not None:
            self._deadline = self._loop.call_at(nxt + 0.001, self._form)

    def _send_group(self, group: Group) -> None:
        gid = new_group_id()
        frames = group_frames(group, gid, new_token())
        self.groups_formed += 1
        host = group.host.hello
        self.grouper.bans.placed(host.fingerprint, gid, (w.hello.fingerprint for w in group.workers))
        logger.info(
            "matchmaker: group %s formed: host %r (%s) + %d worker(s) [%s], waited %.1f s",
            gid, host.name, host.address, len(group.workers),
            ", ".join(f"{w.hello.name}@{w.hello.address}" for w in group.workers),
            self.now() - group.host.joined,
        )
        for cid, frame in frames.items():
            conn = self.conns.get(cid)
            if conn is not None:
                conn.finish(frame)

    def _send_join(self, join: Join) -> None:
        newcomer, joined = join_frames(join)
        self.joins += 1
        self.grouper.bans.placed(join.host.hello.fingerprint, join.group_id, (join.member.fingerprint,))
        w = join.worker.hello
        session = self.grouper.open.get(join.host.id)
        logger.info(
            "matchmaker: worker %r (%s) joins session %s of host %r as member %d (%d free left), waited %.1f s",
            w.name, w.address, join.group_id, join.host.hello.name, join.member.index,
            session.free if session is not None else 0, self.now() - join.worker.joined,
        )
        host = self.conns.get(join.host.id)
        if host is not None:
            host.send(joined)
        conn = self.conns.get(join.worker.id)
        if conn is not None:
            conn.finish(newcomer)

    # periodic work
    async def _every(self, interval: float, fn: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                fn()
            except Exception:
                logger.exception("matchmaker: periodic task failed")

    def _notify_positions(self) -> None:
        if not self._positions_dirty:
            return
        self._positions_dirty = False
        for cid, pos in self.grouper.positions().items():
            conn = self.conns.get(cid)
            if conn is not None:
                conn.position = pos
                if pos != conn.sent_position:
                    conn.send_wait()

    def _settle(self) -> None:
        """Keep the collector's full passes few and short. A waiting client is a few dozen
        tracked objects (its TLS layer, transports, hello), so with 10,000 of them each full
        pass stalls the loop for a good part of a second, and Python makes one whenever the
        heap has grown by a quarter: over a dozen while the queue fills. Instead, once
        ``SETTLE_EVERY`` clients have arrived, collect the garbage among the objects made
        since the last pass and freeze the survivors, so the next pass walks only what is
        new. A frozen object is still freed by reference counting, but one in a cycle is not
        (asyncio's socket transport is one, with its own bound method): once as many
        connections have closed as are open (and ``RECLAIM_MIN`` at least), one full pass
        over everything reclaims them, so collecting costs O(1) per connection."""
        if self._closed >= max(RECLAIM_MIN, len(self.conns)):
            self._closed = self._unsettled = 0
            gc.unfreeze()
            gc.collect()
            gc.freeze()
        elif self._unsettled >= SETTLE_EVERY:
            self._unsettled = 0
            gc.collect()
            gc.freeze()

    def _sweep(self) -> None:
        self._settle()
        now = self.now()
        self._expire_arrivals(now)
        cfg = self.cfg
        for conn in list(self.conns.values()):
            reason = None
            if conn.state == "new" and now - conn.connected_at > cfg.read_timeout:
                reason = f"no hello within {cfg.read_timeout} s"
            elif conn.partial_since is not None and now - conn.partial_since > cfg.read_timeout:
                reason = f"stalled mid-frame for {cfg.read_timeout} s"
            elif conn.state == "waiting" and now - conn.last_rx > cfg.heartbeat_timeout:
                reason = f"silent for {cfg.heartbeat_timeout} s"
            if reason is not None:
                self.dropped += 1
                logger.info("matchmaker: dropping client %s (%s): %s", conn.id, conn.ip, reason)
                conn.drop()

    def _status(self) -> None:
        s = self.stats()
        logger.info(
            "matchmaker: %d host(s) and %d worker(s) waiting, %d open session(s), %d connection(s), "
            "%d group(s) formed, %d join(s), %d banned pair(s), %d dropped",
            s["hosts"], s["workers"], s["open"], s["connections"], s["groups"], s["joins"], s["banned"], s["dropped"],
        )


# --------------------------------------------------------------------------- command line


def raise_nofile_limit() -> int | None:
    """Raise the open-file soft limit to the hard limit; return the new soft limit (None: n/a)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit to %d: %s", hard, exc)
    return int(soft)


async def connects(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    return True


def unreachable_host_message(hello: Hello) -> str:
    p = hello.ports
    return (f"this host cannot be reached from the internet at {hello.address}:{p['data']}, so no worker could "
            f"fetch its data or join its session. Forward TCP ports {p['data']} and {p['session']} on your router "
            f"to this machine (fix them with [daemon] data_port and session_port), or set [daemon] advertise_host "
            f"to an address that reaches it (the matchmaker must have trust_advertised = true)")


def server_tls(cert: Path | None, key: Path | None, state_dir: Path) -> tuple[ssl.SSLContext, str]:
    """The matchmaker's TLS 1.3 context and its certificate's fingerprint: the operator's
    certificate and key, or else a self-signed identity kept in ``state_dir`` (made once).
    No client certificate is requested (a volunteer's identity travels in its hello)."""
    if cert is not None and key is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            ctx.load_cert_chain(cert, key)
            fingerprint = fingerprint_of(cert.read_bytes())
        except (OSError, ssl.SSLError, InputError) as exc:
            raise InputError(f"cannot use the certificate {cert} with the key {key}: {exc}", field="cert") from None
    else:
        identity = Identity.load_or_create(state_dir, "matchmaker")
        ctx, fingerprint = server_context(identity), identity.fingerprint
    ctx.num_tickets = 0  # clients never resume a session: no tickets to send or keep
    return ctx, fingerprint


async def serve(
    cfg: MatchmakerConfig, host: str, port: int, stop: asyncio.Event | None = None, *,
    tls: ssl.SSLContext | None = None, fingerprint: str = "",
) -> int:
    """Run until ``stop`` is set or SIGINT/SIGTERM arrives."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    mm = Matchmaker(cfg)
    try:
        await mm.start(host, port, tls)
        # Everything loaded so far lives for the whole run: keep it out of the collector's
        # full passes, which otherwise stall the loop in proportion to the heap.
        gc.collect()
        gc.freeze()
        bound_host, bound_port = mm.address
        print(f"crowdd matchmaker listening on {bound_host}:{bound_port}", file=sys.stderr, flush=True)
        if fingerprint:
            print(f"crowdd matchmaker fingerprint {fingerprint}\n"
                  f"  volunteers pin it: [daemon] matchmaker_fingerprint = \"{fingerprint}\"", file=sys.stderr, flush=True)
            logger.info("matchmaker fingerprint %s  put it in [daemon] matchmaker_fingerprint", fingerprint)
        await stop.wait()
        logger.info("matchmaker: stopping")
    finally:
        await mm.close()
        for sig in installed:
            loop.remove_signal_handler(sig)
    return 0


def main(args: argparse.Namespace) -> int:
    """``crowdd matchmaker [--listen HOST:PORT] [--cert CRT --key KEY] [--state-dir DIR] [--config FILE]``."""
    from crowdd.client.resolve import resolve_config

    cfg, paths = resolve_config(args)
    cert, key = getattr(args, "cert", None), getattr(args, "key", None)
    if (cert is None) != (key is None):
        print("crowdd matchmaker: --cert and --key go together", file=sys.stderr)
        return 2
    try:
        state_dir = getattr(args, "state_dir", None)
        tls, fingerprint = server_tls(cert, key, state_dir if state_dir is not None else paths.identity_dir)
    except CrowddError as exc:
        print(f"crowdd matchmaker: {exc.message}", file=sys.stderr)
        return 2
    mcfg = cfg.matchmaker
    listen = getattr(args, "listen", None) or mcfg.listen
    try:
        host, port = parse_hostport(listen)
    except ValueError as exc:
        print(f"crowdd matchmaker: bad --listen: {exc}", file=sys.stderr)
        return 2
    limit = raise_nofile_limit()
    if limit is not None and limit < mcfg.max_clients + 64:
        logger.warning(
            "open-file limit %d is below max_clients %d: the matchmaker may run out of sockets", limit, mcfg.max_clients
        )
    try:
        return asyncio.run(serve(mcfg, host, port, tls=tls, fingerprint=fingerprint))
    except OSError as exc:
        print(f"crowdd matchmaker: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1


__all__ = [
    "Group",
    "Grouper",
    "Hello",
    "Join",
    "OpenGroup",
    "Matchmaker",
    "Waiter",
    "admit",
    "check_hello",
    "connects",
    "group_frames",
    "join_frames",
    "main",
    "matches",
    "raise_nofile_limit",
    "serve",
    "server_tls",
    "unreachable_host_message",
]

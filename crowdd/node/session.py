"""The group session: after the matchmaker's ``group`` frame, the host daemon leads.

Each worker daemon keeps one connection to the host's session port: TLS 1.3, mutual, pinned to
the group's certificates (:class:`crowdd.trust.group_tls.GroupTLS`; the host checks that the
certificate is the one of the member index claimed), then :mod:`crowdd.trust.auth` (purpose
``"session"``, keyed by the group token). The same port takes the workers' tunnel streams
(a hello with ``"tunnel"``; :mod:`crowdd.node.tunnels`). Frames (wire codec):

Messages: :mod:`crowdd.protocol.session` (typed, checked on arrival). The flows talk to
:class:`HostSession` and :class:`WorkerSession` methods (``ready()``, ``report_replication()``,
``start_training()``, ``end()``...), never to frame dicts.

Heartbeats both ways: each side pings every ``heartbeat`` seconds and gives the other up
after ``dead_after`` seconds of silence (or at once when the connection closes). A worker
that loses its host raises :class:`HostLost`; a host that loses a worker marks it ``gone``
and carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from crowdd import wire
from crowdd.trust import auth
from crowdd.aio import cancel_and_wait, spawn_tracked
from crowdd.trust.group_tls import GroupTLS
from crowdd.plan import PlanMember, SessionPlan
from crowdd.protocol.session import (
    DROPPABLE,
    Away,
    Back,
    Dial,
    End,
    HostMessage,
    JobReport,
    MembersUpdate,
    MemberView,
    Ready,
    ReplicationReport,
    StateReport,
    Train,
    TrainingEvent,
    WorkerMessage,
    check_host_frame,
    check_worker_frame,
)

logger = logging.getLogger(__name__)

PURPOSE = "session"
QUEUE_SIZE = 1024
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
OnTunnel = Callable[[int, dict[str, Any], Streams], Awaitable[None]]


class PeerLost(Exception):
    """The other side of a session channel closed or went silent."""


class HostLost(PeerLost):
    """A worker lost its session host before the session ended."""


class SessionRefused(Exception):
    """The host refused this worker (bad token, bad index)."""


def dead_after(heartbeat: float, peer_timeout: float) -> float:
    """How long a silent peer is given: short enough to act within ``peer_timeout``."""
    return max(2.0 * heartbeat, peer_timeout - heartbeat)


# --------------------------------------------------------------------------- one channel


class Channel:
    """Frames both ways over one authenticated connection, with heartbeats."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        heartbeat: float,
        dead_after: float,
        name: str = "peer",
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._heartbeat = heartbeat
        self._dead_after = dead_after
        self.name = name
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._closed = False
        self._writer_task: asyncio.Task[None] | None = None

    def send(self, msg: dict[str, Any]) -> None:
        """Queue a frame; never blocks. Under pressure, droppable frames are shed first."""
        if self._closed:
            return
        if self._queue.qsize() >= QUEUE_SIZE and msg.get("type") in DROPPABLE:
            return
        self._queue.put_nowait(msg)

    async def _write_loop(self) -> None:
        while True:
            msg = await self._queue.get()
            try:
                await wire.write_frame(self._writer, msg, timeout=self._dead_after)
            finally:
                self._queue.task_done()

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat)
            self.send({"type": "ping"})

    def _ensure_writer(self) -> asyncio.Task[None]:
        if self._writer_task is None or self._writer_task.done():
            self._writer_task = asyncio.create_task(self._write_loop())
        return self._writer_task

    async def run(self, on_frame: Callable[[dict[str, Any]], bool | None]) -> None:
        """Read frames until the peer goes away (raises :class:`PeerLost`) or ``on_frame``
        returns True (the conversation is over)."""
        writer_task = self._ensure_writer()
        pinger = asyncio.create_task(self._ping_loop())
        read: asyncio.Task[dict[str, Any]] | None = None
        try:
            while True:
                read = asyncio.create_task(wire.read_frame(self._reader, timeout=self._dead_after))
                done, _ = await asyncio.wait({read, writer_task}, return_when=asyncio.FIRST_COMPLETED)
                if writer_task in done:
                    await cancel_and_wait(read)
                    exc = None if writer_task.cancelled() else writer_task.exception()
                    raise PeerLost(f"{self.name}: cannot write ({exc})")
                try:
                    frame = read.result()
                except wire.FrameTimeout:
                    raise PeerLost(f"{self.name}: silent for {self._dead_after:.0f} s") from None
                except (wire.ConnectionClosed, ConnectionError) as exc:
                    raise PeerLost(f"{self.name}: connection closed ({exc})") from None
                except wire.WireError as exc:
                    raise PeerLost(f"{self.name}: bad frame ({exc.message})") from None
                if frame["type"] == "ping":
                    continue
                if frame["type"] == "error":
                    raise PeerLost(f"{self.name}: error {frame.get('code')}: {frame.get('message')}")
                if on_frame(frame):
                    return
        finally:
            await cancel_and_wait(pinger, read)

    async def flush(self, timeout: float = 2.0) -> None:
        """Wait (bounded) until queued frames are written; used before a clean close."""
        writer_task = self._ensure_writer()
        join = asyncio.create_task(self._queue.join())
        await asyncio.wait({join, writer_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        await cancel_and_wait(join)

    async def close(self) -> None:
        self._closed = True
        await cancel_and_wait(self._writer_task)
        await wire.close_writer(self._writer)


# --------------------------------------------------------------------------- host side


@dataclass
class Member:
    """One member of the group as the host sees it."""

    index: int
    name: str
    address: str
    role: str
    state: str = "joining"
    done: int = 0
    total: int = 0
    source: int | None = None
    connected: bool = False
    alive: bool = True
    ready: bool = False
    started: bool = False
    away: str | None = None  # why it is away (its machine busy), while it is
    rejoins: int = 0
    slot: int | None = None  # its TF worker task while training (None: none, or given to a newcomer)
    gone_since: float | None = None  # when it left the session (time.monotonic()), while it is gone
    why_gone: str | None = None
    expelled: str | None = None  # why the host expelled it (it stays out of this session)
    tf_port: int = 0
    channel: Channel | None = field(default=None, repr=False)

    def view(self) -> MemberView:
        return MemberView(self.index, self.name, self.address, self.role, self.state, self.done, self.total,
                          self.expelled or "")

    def to_dict(self) -> dict[str, Any]:
        return self.view().to_dict()

    @classmethod
    def from_plan(cls, m: PlanMember, total: int) -> Member:
        return cls(index=m.index, name=m.name, address=m.address, role=m.role, total=total,
                   tf_port=m.ports.tf[0] if m.ports.tf else 0)


def members_from_plan(plan: SessionPlan) -> list[Member]:
    total = plan.dataset.size
    members = [Member.from_plan(m, total) for m in plan.members]
    members[0].done = total  # the host holds the data from the start
    members[0].ready = members[0].connected = True
    return members


class HostSession:
    """The leader's side: one authenticated channel per worker on the session port."""

    def __init__(
        self,
        plan: SessionPlan,
        sock: socket.socket,
        *,
        tls: GroupTLS,
        heartbeat: float,
        dead_after: float,
        on_change: Callable[[Member | None], None],
        on_message: Callable[[Member, WorkerMessage], None] | None = None,
        on_tunnel: OnTunnel | None = None,
        join_timeout: float = 30.0,
        on_rejoin: Callable[[Member, bool], None] | None = None,
    ) -> None:
        self.plan = plan
        self.tls = tls
        self.on_tunnel = on_tunnel
        self.token = plan.token
        self.members = members_from_plan(plan)
        self._sock = sock
        self._heartbeat = heartbeat
        self._dead_after = dead_after
        self._on_change = on_change
        self._on_message = on_message
        self._join_timeout = join_timeout
        self._on_rejoin = on_rejoin
        #: set while training: a worker that lost its channel (froze, lost its network, its
        #: daemon restarted) may come back to its slot instead of the group going on without it
        self.rejoin_open = False
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    @property
    def workers(self) -> list[Member]:
        return self.members[1:]

    def add_member(self, pm: PlanMember) -> Member:
        """A newcomer the matchmaker sent to this running session (join in progress): pin its
        certificate and expect its session channel at its index."""
        self.tls.add(pm)
        m = Member.from_plan(pm, self.plan.dataset.size)
        self.members.append(m)
        self.plan = dataclasses.replace(self.plan, members=(*self.plan.members, pm))
        logger.info("worker %d (%s) joins the running session", m.index, m.name)
        self._touch(m)
        return m

    def live_workers(self) -> list[Member]:
        return [m for m in self.workers if m.alive]

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_client, sock=self._sock, ssl=self.tls.server(), ssl_handshake_timeout=self.tls.handshake_timeout
        )
        loop = asyncio.get_running_loop()
        loop.call_later(self._join_timeout, self._drop_absent)

    def _drop_absent(self) -> None:
        for m in self.workers:
            if m.alive and not m.connected:
                logger.warning("worker %d (%s) never joined the session; dropped", m.index, m.name)
                self._lose(m, "never joined")

    def _lose(self, m: Member, why: str, channel: Channel | None = None) -> None:
        if not m.alive or (channel is not None and m.channel is not channel):
            return  # already gone, or this is an old channel of a member that came back
        m.alive = False
        m.state = "gone"
        m.channel = None
        m.gone_since, m.why_gone = time.monotonic(), why
        self._touch(m)
        logger.info("worker %d (%s) left the session: %s", m.index, m.name, why)

    def _touch(self, m: Member | None) -> None:
        self._changed.set()
        try:
            self._on_change(m)
        except Exception:  # a UI callback must not break the session
            logger.exception("session change callback failed")

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        spawn_tracked(self._tasks, self._serve(reader, writer))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await auth.accept(reader, writer, self.token, PURPOSE, timeout=self._dead_after)
        except auth.AuthError as exc:
            logger.info("session: refused a connection: %s", exc)
            return
        index = hello.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index < len(self.members):
            await wire.send_error_and_close(
                writer, wire.WireError(wire.ErrorCode.BAD_FIELD, "index is not a worker of this group", field="index")
            )
            return
        try:
            self.tls.check(writer, index)
        except auth.AuthError as exc:
            await wire.send_error_and_close(writer, wire.WireError(wire.ErrorCode.UNAUTHORIZED, exc.message))
            return
        m = self.members[index]
        if "tunnel" in hello:
            if not m.alive or self.on_tunnel is None:
                await wire.close_writer(writer)
                return
            await self.on_tunnel(index, hello, (reader, writer))
            return
        rejoin = hello.get("rejoin") is True and self.rejoin_open and m.slot is not None and m.expelled is None
        if not rejoin and (not m.alive or m.channel is not None):
            await wire.send_error_and_close(
                writer, wire.WireError(wire.ErrorCode.BAD_FIELD, f"worker {index} is already in (or gone from) the session", field="index")
            )
            return
        channel = Channel(reader, writer, heartbeat=self._heartbeat, dead_after=self._dead_after, name=f"worker {index}")
        if rejoin:
            old = m.channel
            if m.alive:
                self._lose(m, "it connected again")
            if old is not None:
                spawn_tracked(self._tasks, old.close())
            m.alive, m.connected, m.ready, m.away = True, True, True, None
            m.gone_since = m.why_gone = None
            m.started = hello.get("job") == "running"  # its TF server kept its state
            m.rejoins += 1
            m.state = "training" if m.started else "ready"
            logger.info("worker %d (%s) came back to the session (its TF server %s)", m.index, m.name,
                        "kept running" if m.started else "must start again")
        else:
            m.connected = True
            m.state = "replicating"
        m.channel = channel
        self._touch(m)
        channel.send(self.members_update().to_frame())
        if rejoin and self._on_rejoin is not None:
            self._on_rejoin(m, m.started)
        try:
            await channel.run(lambda frame: self._on_frame(m, frame))
        except PeerLost as exc:
            self._lose(m, str(exc), channel)
        finally:
            await channel.close()

    def _on_frame(self, m: Member, frame: dict[str, Any]) -> bool:
        try:
            msg = check_worker_frame(frame)
        except wire.WireError as exc:
            self._lose(m, f"it sent a bad frame ({exc.message})")
            return True
        if isinstance(msg, StateReport):
            m.state = msg.state
        elif isinstance(msg, ReplicationReport):
            m.done, m.total, m.source = msg.done, msg.total, msg.source
        elif isinstance(msg, Ready):
            m.ready = True
            m.done = m.total
            m.state = "ready"
        elif isinstance(msg, JobReport):
            if msg.event == "started":
                m.started = True
                m.state = "away" if m.away else "training"
            else:
                self._lose(m, f"its job exited ({msg.message or msg.code})")
                return True
        elif isinstance(msg, Away):
            m.away = msg.reason
            m.state = "away"
            logger.info("worker %d (%s) is away: %s%s", m.index, m.name, msg.reason,
                        "" if msg.staying else " (leaving the session)")
        elif isinstance(msg, Back):
            m.away = None
            m.state = "training" if m.started else "ready"
            logger.info("worker %d (%s) is back", m.index, m.name)
        if self._on_message is not None:
            self._on_message(m, msg)
        self._touch(m)
        return False

    # ------------------------------------------------------------------ what the host says

    def members_update(self) -> MembersUpdate:
        return MembersUpdate(tuple(m.view() for m in self.members))

    def member_dicts(self) -> list[dict[str, Any]]:
        return [m.to_dict() for m in self.members]

    def _broadcast(self, frame: dict[str, Any]) -> None:
        for m in self.live_workers():
            if m.channel is not None:
                m.channel.send(frame)

    def push_members(self) -> None:
        """Send every live worker the group's current member list."""
        self._broadcast(self.members_update().to_frame())

    def fan_out(self, event: dict[str, Any]) -> None:
        """Send every live worker one of the host job's events (``progress``, ``eval``)."""
        self._broadcast(TrainingEvent(event).to_frame())

    def dial(self, member: int, stream: int, task: int) -> bool:
        """Ask worker ``member`` to dial tunnel stream ``stream`` back for its TF task ``task``."""
        m = self.members[member] if 0 < member < len(self.members) else None
        if m is None or not m.alive or m.channel is None:
            return False
        m.channel.send(Dial(stream, task).to_frame())
        return True

    def drop(self, m: Member, why: str) -> None:
        """Give worker ``m`` up and tell it why (it stays out of this session)."""
        if m.channel is not None:
            m.channel.send(End(error=f"the host dropped this worker: {why}").to_frame())
        logger.warning("worker %d (%s) dropped: %s", m.index, m.name, why)
        self._lose(m, why)

    def expel(self, m: Member, why: str) -> None:
        """Cut worker ``m`` from the session for good: its changes kept failing the host's
        validation. It is told why, and shows as ``expelled`` with the reason."""
        if m.channel is not None:
            m.channel.send(End(error=f"the host expelled this worker: {why}").to_frame())
        logger.warning("worker %d (%s) expelled: %s", m.index, m.name, why)
        self._lose(m, f"expelled: {why}")
        m.state, m.expelled = "expelled", why
        m.slot = None  # its place is free for a newcomer; it cannot come back to it
        self._touch(m)

    def start_training(self, m: Member, cluster: dict[str, list[str]], task_index: int) -> None:
        """Tell worker ``m`` to start its TF server as cluster worker ``task_index``."""
        if m.alive and m.channel is not None:
            m.channel.send(Train(cluster, task_index).to_frame())

    async def _wait_until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not done():
            self._changed.clear()
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True

    async def wait_ready(self) -> list[Member]:
        """Until every live worker holds verified data; returns them."""
        await self._wait_until(lambda: all(m.ready for m in self.live_workers()), None)
        return self.live_workers()

    async def wait_started(self, workers: list[Member], timeout: float) -> list[Member]:
        """Until these workers' TF servers run (or gave up); returns those that started."""
        await self._wait_until(lambda: all(m.started or not m.alive for m in workers), timeout)
        return [m for m in workers if m.started and m.alive]

    async def end(self, result: End) -> None:
        """Tell every worker the result, flush, close."""
        self._broadcast(result.to_frame())
        await asyncio.gather(
            *(m.channel.flush(2.0) for m in self.live_workers() if m.channel is not None), return_exceptions=True
        )
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await cancel_and_wait(*self._tasks)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None


# --------------------------------------------------------------------------- worker side


class WorkerSession:
    """A worker's channel to its host (the plan's member 0)."""

    def __init__(
        self,
        plan: SessionPlan,
        *,
        tls: GroupTLS,
        heartbeat: float,
        dead_after: float,
        on_message: Callable[[HostMessage], None],
    ) -> None:
        self.plan = plan
        self._tls = tls
        self._host = plan.host.address
        self._port = plan.host.ports.session
        self._token = plan.token
        self._index = plan.index
        self._heartbeat = heartbeat
        self._dead_after = dead_after
        self._on_message = on_message
        self._channel: Channel | None = None
        self.end: End | None = None

    async def connect(self, retry_for: float = 15.0, hello: dict[str, Any] | None = None) -> None:
        """Open the session channel (``hello``: extra fields, e.g. a rejoin's)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_for
        delay = 0.1
        self.end = None
        while True:
            try:
                reader, writer = await self.open_stream(dict(hello or {}))
                break
            except auth.AuthError as exc:
                if not exc.unreachable or loop.time() + delay > deadline:
                    raise SessionRefused(f"cannot join the session at {self._host}:{self._port}: {exc}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self._channel = Channel(
            reader, writer, heartbeat=self._heartbeat, dead_after=self._dead_after, name="session host"
        )

    async def open_stream(self, extra: dict[str, Any]) -> Streams:
        """A new authenticated connection to the host's session port, its hello carrying
        ``extra`` (a tunnel stream). Raises :class:`auth.AuthError`."""
        reader, writer, _ = await auth.connect(
            self._host, self._port, self._token, PURPOSE, {"index": self._index, **extra}, timeout=self._dead_after,
            ssl=self._tls.client(0),
        )
        return reader, writer

    # ------------------------------------------------------------------ what the worker says

    def _send(self, frame: dict[str, Any]) -> None:
        if self._channel is not None:
            self._channel.send(frame)

    def report_state(self, state: str) -> None:
        self._send(StateReport(state).to_frame())

    def report_replication(self, done: int, total: int, source: int | None) -> None:
        self._send(ReplicationReport(done, total, source).to_frame())

    def ready(self) -> None:
        """This node holds the dataset, verified."""
        self._send(Ready().to_frame())

    def job_started(self) -> None:
        self._send(JobReport("started").to_frame())

    def job_exited(self, code: int | None, message: str | None) -> None:
        self._send(JobReport("exited", code, message).to_frame())

    def away(self, reason: str, staying: bool = True) -> None:
        """This machine is busy: stop counting on it (before its job is suspended or it leaves)."""
        self._send(Away(reason, staying).to_frame())

    def back(self) -> None:
        self._send(Back().to_frame())

    def _on_frame(self, frame: dict[str, Any]) -> bool:
        msg = check_host_frame(frame)  # a bad frame ends the session (run() says HostLost)
        if isinstance(msg, End):
            self.end = msg
            return True
        try:
            self._on_message(msg)
        except Exception:
            logger.exception("session message handler failed")
        return False

    async def run(self) -> End:
        """Until the host says ``end`` (returned); :class:`HostLost` if the host goes away first."""
        if self._channel is None:
            raise HostLost("not connected")
        try:
            await self._channel.run(self._on_frame)
        except PeerLost as exc:
            raise HostLost(str(exc)) from None
        except wire.WireError as exc:
            raise HostLost(f"the host sent a bad frame ({exc.message})") from None
        if self.end is None:  # pragma: no cover - run() returns only on end
            raise HostLost("session ended without a result")
        return self.end

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.flush(1.0)
            await self._channel.close()
            self._channel = None

    async def drop_channel(self) -> None:
        """Close a channel that failed, without flushing (before connecting again)."""
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()
            self._channel = None


__all__ = [
    "Channel",
    "HostLost",
    "HostSession",
    "Member",
    "PeerLost",
    "SessionRefused",
    "WorkerSession",
    "dead_after",
    "members_from_plan",
]

"""The matchmaker's server: :class:`Matchmaker` is the asyncio I/O around the decisions of
:mod:`crowdd.matchmaker.grouping` (TLS handshakes taken in turns: :mod:`crowdd.matchmaker.handshakes`): one lightweight :class:`asyncio.Protocol` per connection (no task, no stream
objects, so 10,000 waiting clients stay cheap), fed through :class:`wire.FrameDecoder`, and one
sweep that enforces every timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import ssl
import typing
from collections.abc import Mapping
from typing import Any

from crowdd import wire
from crowdd.aio import spawn_tracked
from crowdd.config import MatchmakerConfig
from crowdd.matchmaker.handshakes import HandshakeGate
from crowdd.matchmaker.grouping import Group, Grouper, Join, Waiter, admit, source, group_frames, join_frames, new_group_id, new_token
from crowdd.protocol.matchmaker import (
    HOST,
    Expel,
    Hello,
    Slots,
    check_expel,
    check_hello,
    is_public,
    check_slots,
    make_expelled,
    make_wait,
)

logger = logging.getLogger(__name__)

WAIT_INTERVAL = 1.0
MAX_UNSENT = 1 << 20
#: New connections between two :meth:`Matchmaker._settle` passes.
SETTLE_EVERY = 256
#: Closed connections (at least) between two full passes that reclaim frozen garbage.
RECLAIM_MIN = 1024


# --------------------------------------------------------------------------- I/O


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
        "source",
        "state",
        "transport",
    )

    def __init__(self, server: Matchmaker) -> None:
        self.server = server
        self.id = server._next_id()
        self.transport: asyncio.Transport | None = None
        self.ip = ""
        self.source = ""  # what the per-source limits count it against (grouping.source)
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
        self.source = source(self.ip)
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
        self._unsettled = 0
        self._closed = 0
        self.gate: HandshakeGate | None = None  # with TLS

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
        if tls is not None:
            self.gate = HandshakeGate(self._loop, tls, self.cfg.read_timeout, lambda: _Conn(self), self._closed_early,
                                      per_source=self.cfg.max_handshaking_per_ip, total=self.cfg.max_handshaking)
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
        if self.gate is not None:
            self.gate.close()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
        self._server = None

    def _protocol(self) -> asyncio.BaseProtocol:
        """A new connection: plain, or (with TLS) one that waits its turn at the gate."""
        return _Conn(self) if self.gate is None else self.gate.arrival()

    def _closed_early(self) -> None:
        self._closed += 1

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
            "dropped": self.dropped + (self.gate.dropped if self.gate is not None else 0),
            "tls_refused": self.gate.refused if self.gate is not None else 0,
            "handshaking": self.gate.handshaking if self.gate is not None else 0,
            "arrivals": len(self.gate.arrivals) if self.gate is not None else 0,
        }

    # connection bookkeeping
    def _connected(self, conn: _Conn) -> None:
        err = admit(len(self.conns), self.per_ip.get(conn.source, 0), self.cfg)
        if err is not None:
            logger.info("matchmaker: refusing %s: %s", conn.ip, err.message)
            conn.finish(err.to_frame())
            return
        self.conns[conn.id] = conn
        self.per_ip[conn.source] = self.per_ip.get(conn.source, 0) + 1
        self._unsettled += 1

    def _disconnected(self, conn: _Conn) -> None:
        self._leave(conn)
        self._closed += 1
        if self.conns.pop(conn.id, None) is not None:
            left = self.per_ip.get(conn.source, 1) - 1
            if left > 0:
                self.per_ip[conn.source] = left
            else:
                self.per_ip.pop(conn.source, None)

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
        if self.gate is not None:
            self.gate.expire(now)
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


__all__ = ["Matchmaker", "connects", "unreachable_host_message"]

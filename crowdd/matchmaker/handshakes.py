"""The matchmaker's TLS handshakes, taken in turns: :class:`HandshakeGate`.

A new connection waits as an :class:`_Arrival` (a socket, reading paused, no TLS state) until
one of ``MAX_HANDSHAKES`` handshake slots is free; then asyncio's TLS layer (:class:`_TLS`, with a
small read buffer) runs its handshake in front of the server's protocol for that client, which
sees only the decrypted stream, from a completed handshake on. A burst of arrivals costs a socket
each, not a TLS state each, and the handshakes run as fast as the CPU allows. One that waits
``read_timeout`` for its turn is closed; a failed handshake is logged with why.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import ssl
import typing
from asyncio import sslproto
from collections.abc import Callable

from crowdd.matchmaker.grouping import source

log = logging.getLogger(__name__)

#: TLS handshakes run at once; later connections wait their turn (reading paused, no TLS state).
MAX_HANDSHAKES = 256


class Client(typing.Protocol):
    """The server's protocol for one client: its ``transport`` is set once it is connected."""

    transport: asyncio.Transport | None

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...


class _Arrival(asyncio.Protocol):
    """A raw connection waiting for a handshake slot: nothing is read and no TLS state is
    made until the gate hands its transport to a :class:`_TLS`."""

    __slots__ = ("arrived", "gate", "source", "transport")

    def __init__(self, gate: HandshakeGate) -> None:
        self.gate = gate
        self.transport: asyncio.Transport | None = None
        self.arrived = gate.loop.time()
        self.source = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.pause_reading()  # before asyncio starts reading: the handshake reads first
        peer = transport.get_extra_info("peername")
        self.source = source(str(peer[0])) if isinstance(peer, tuple) and peer else "?"
        self.gate.arrived(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:  # gone while waiting; skipped when its turn comes
            self.transport = None
            self.gate.left(self.source)
        self.gate.closed()


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


class HandshakeGate:
    """Handshakes for ``tls``: ``client()`` makes the server's protocol for a client whose
    handshake starts; ``closed()`` counts a connection that ended before it was the server's.

    Connections not yet through their handshake (waiting or handshaking) are counted per
    source (an IPv4 address, an IPv6 /64: :func:`crowdd.matchmaker.grouping.source`) and in
    all: past ``per_source`` or ``total`` of them a new connection is closed at once, so that
    stalled handshakes from one place (or from many) cannot hold the matchmaker's sockets and
    keep everyone else waiting."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: ssl.SSLContext, read_timeout: float,
                 client: Callable[[], Client], closed: Callable[[], None], *, per_source: int = 64,
                 total: int = 8192) -> None:
        self.loop, self.tls, self.read_timeout = loop, tls, read_timeout
        self.per_source, self.total = per_source, total
        self.client, self.closed = client, closed
        self.arrivals: collections.deque[_Arrival] = collections.deque()
        self.handshaking = 0
        self.refused = 0  # handshakes that failed
        self.dropped = 0  # connections that waited too long for their turn, or found no room
        self.pending: dict[str, int] = {}  # not yet through the handshake, per source
        self.pending_total = 0
        self._logged: set[str] = set()

    def arrival(self) -> asyncio.Protocol:
        """The protocol of a new connection: it waits its turn."""
        return _Arrival(self)

    def arrived(self, arrival: _Arrival) -> None:
        src, t = arrival.source, arrival.transport
        if self.pending.get(src, 0) >= self.per_source or self.pending_total >= self.total:
            self.dropped += 1
            if self.dropped_from(src):
                log.info("matchmaker: closing a connection from %s: %d not yet through their TLS handshake "
                         "(%d in all)", src, self.pending.get(src, 0), self.pending_total)
            arrival.transport = None
            if t is not None:
                t.abort()
            return
        self.pending[src] = self.pending.get(src, 0) + 1
        self.pending_total += 1
        self.arrivals.append(arrival)
        self._next()

    def dropped_from(self, src: str) -> bool:
        """Whether to log a drop from ``src`` (the first of each burst: a flood is not a log flood)."""
        first = src not in self._logged
        self._logged.add(src)
        if len(self._logged) > 1024:
            self._logged.clear()
        return first

    def left(self, src: str) -> None:
        """A connection from ``src`` is through its handshake, or gone."""
        n = self.pending.get(src, 0) - 1
        if n > 0:
            self.pending[src] = n
        else:
            self.pending.pop(src, None)
            self._logged.discard(src)
        self.pending_total = max(0, self.pending_total - 1)

    def _next(self) -> None:
        """Start waiting handshakes while slots are free."""
        while self.handshaking < MAX_HANDSHAKES and self.arrivals:
            arrival = self.arrivals.popleft()
            t = arrival.transport
            if t is None or t.is_closing():
                continue
            arrival.transport = None  # the layer's now: its end is counted in _handshaken
            conn = self.client()
            done = self.loop.create_future()
            layer = _TLS(self.loop, conn, self.tls, done, server_side=True,  # type: ignore[arg-type]
                         ssl_handshake_timeout=self.read_timeout)  # type: ignore[arg-type]  # typeshed: int
            done.add_done_callback(functools.partial(self._handshaken, layer, conn, arrival.source))
            self.handshaking += 1
            t.set_protocol(layer)  # what loop.start_tls does, without a task per connection
            layer.connection_made(t)
            t.resume_reading()

    def expire(self, now: float) -> None:
        """Close connections that waited ``read_timeout`` for a handshake slot."""
        while self.arrivals and now - self.arrivals[0].arrived > self.read_timeout:
            arrival = self.arrivals.popleft()
            t, arrival.transport = arrival.transport, None
            if t is not None:
                self.left(arrival.source)
                self.dropped += 1
                t.abort()

    def _handshaken(self, layer: _TLS, conn: Client, src: str, done: asyncio.Future[None]) -> None:
        self.handshaking -= 1
        self.left(src)
        self._next()
        exc = None if done.cancelled() else done.exception()
        if exc is None and conn.transport is not None:
            return  # the connection is the client's now
        self.closed()
        if exc is None:
            return  # the peer left before finishing the handshake
        self.refused += 1
        if isinstance(exc, ssl.SSLError) and exc.reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"):
            why = "it does not speak TLS (a plaintext client, an older crowdd, or not crowdd at all)"
        elif isinstance(exc, ssl.SSLError) and exc.reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"):
            why = "it does not offer TLS 1.3"
        elif isinstance(exc, ConnectionAbortedError):
            why = f"no TLS handshake within {self.read_timeout} s"
        else:
            why = "the TLS handshake failed"
        log.info("matchmaker: refusing a connection from %s: %s (%s)", layer.peer, why, exc)

    def close(self) -> None:
        """Every connection still waiting is closed."""
        while self.arrivals:
            arrival = self.arrivals.popleft()
            waiting, arrival.transport = arrival.transport, None
            if waiting is not None:
                waiting.abort()


__all__ = ["MAX_HANDSHAKES", "HandshakeGate"]

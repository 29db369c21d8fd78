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

    __slots__ = ("arrived", "gate", "transport")

    def __init__(self, gate: HandshakeGate) -> None:
        self.gate = gate
        self.transport: asyncio.Transport | None = None
        self.arrived = gate.loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.pause_reading()  # before asyncio starts reading: the handshake reads first
        self.gate.arrived(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None  # gone while waiting; skipped when its turn comes
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
    handshake starts; ``closed()`` counts a connection that ended before it was the server's."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: ssl.SSLContext, read_timeout: float,
                 client: Callable[[], Client], closed: Callable[[], None]) -> None:
        self.loop, self.tls, self.read_timeout = loop, tls, read_timeout
        self.client, self.closed = client, closed
        self.arrivals: collections.deque[_Arrival] = collections.deque()
        self.handshaking = 0
        self.refused = 0  # handshakes that failed
        self.dropped = 0  # connections that waited too long for their turn

    def arrival(self) -> asyncio.Protocol:
        """The protocol of a new connection: it waits its turn."""
        return _Arrival(self)

    def arrived(self, arrival: _Arrival) -> None:
        self.arrivals.append(arrival)
        self._next()

    def _next(self) -> None:
        """Start waiting handshakes while slots are free."""
        while self.handshaking < MAX_HANDSHAKES and self.arrivals:
            t = self.arrivals.popleft().transport
            if t is None or t.is_closing():
                continue
            conn = self.client()
            done = self.loop.create_future()
            layer = _TLS(self.loop, conn, self.tls, done, server_side=True,  # type: ignore[arg-type]
                         ssl_handshake_timeout=self.read_timeout)  # type: ignore[arg-type]  # typeshed: int
            done.add_done_callback(functools.partial(self._handshaken, layer, conn))
            self.handshaking += 1
            t.set_protocol(layer)  # what loop.start_tls does, without a task per connection
            layer.connection_made(t)
            t.resume_reading()

    def expire(self, now: float) -> None:
        """Close connections that waited ``read_timeout`` for a handshake slot."""
        while self.arrivals and now - self.arrivals[0].arrived > self.read_timeout:
            t = self.arrivals.popleft().transport
            if t is not None:
                self.dropped += 1
                t.abort()

    def _handshaken(self, layer: _TLS, conn: Client, done: asyncio.Future[None]) -> None:
        self.handshaking -= 1
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
            waiting = self.arrivals.popleft().transport
            if waiting is not None:
                waiting.abort()


__all__ = ["MAX_HANDSHAKES", "HandshakeGate"]

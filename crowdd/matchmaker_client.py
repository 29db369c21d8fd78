"""Client side of the matchmaker protocol (docs/protocol.md): register, wait, get a group.

:func:`register` connects, says hello, heartbeats while it waits in the queue, reports every
``wait`` frame to ``on_wait`` and returns the ``group`` frame. Cancelling the awaiting task
closes the connection, which removes this node from the queue at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from crowdd import wire
from crowdd.errors import CrowddError
from crowdd.plan import SessionPlan
from crowdd.protocol.matchmaker import Wait, check_group, check_wait
from crowdd.tls import client_context, open_tls

logger = logging.getLogger(__name__)


class MatchmakerUnavailable(wire.ConnectionClosed):
    """Nothing accepted the connection (the matchmaker is down or unreachable)."""


class MatchmakerUntrusted(wire.ConnectionClosed):
    """Something answered, but not the matchmaker this node trusts (another certificate)."""


def _system_trust() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


async def _open(host: str, port: int, fingerprint: str, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TLS 1.3 to the matchmaker: its certificate must have ``fingerprint`` (pinned), or, when
    that is empty, verify against the system trust store for ``host``."""
    try:
        if fingerprint:
            return await open_tls(host, port, client_context(None), expect=fingerprint, timeout=timeout)
        return await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=_system_trust(), server_hostname=host, ssl_handshake_timeout=timeout),
            timeout,
        )
    except CrowddError as exc:  # open_tls: another certificate than the pinned one
        raise MatchmakerUntrusted(
            f"{host}:{port} is not the matchmaker: {exc.message} (check [daemon] matchmaker_fingerprint)"
        ) from None
    except ssl.SSLCertVerificationError as exc:
        raise MatchmakerUntrusted(
            f"the matchmaker at {host}:{port} presented a certificate the system does not trust "
            f"({exc.verify_message}); pin it with [daemon] matchmaker_fingerprint"
        ) from None


async def _heartbeats(writer: asyncio.StreamWriter, interval: float, io_timeout: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await wire.write_frame(writer, {"type": "heartbeat"}, timeout=io_timeout)


async def _conversation(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    hello: Mapping[str, Any],
    heartbeat: float,
    on_wait: Callable[[Wait], None] | None,
    io_timeout: float,
    max_frame: int,
    silence: float,
) -> SessionPlan:
    await wire.write_frame(writer, {**hello, "type": "hello", "proto": wire.PROTO}, timeout=io_timeout)
    beats = asyncio.create_task(_heartbeats(writer, heartbeat, io_timeout))
    read: asyncio.Task[dict[str, Any]] | None = None
    try:
        while True:
            read = asyncio.create_task(wire.read_frame(reader, timeout=silence, max_size=max_frame))
            if not beats.done():
                await asyncio.wait({read, beats}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                # A heartbeat could not be written: the connection is going away. Keep reading:
                # a group frame may still be buffered, else the read reports how it ended.
                logger.debug("matchmaker heartbeat failed; reading what is left")
            try:
                frame = await read
            except wire.ConnectionClosed:
                raise wire.ConnectionClosed("the matchmaker closed the connection before forming a group") from None
            kind = frame["type"]
            if kind == "wait":
                if on_wait is not None:
                    on_wait(check_wait(frame))
            elif kind == "group":
                return check_group(frame)
            elif kind == "error":
                wire.raise_if_error(frame)
            else:
                raise wire.WireError(wire.ErrorCode.UNKNOWN_TYPE, f"unexpected frame {kind!r} from the matchmaker")
    finally:
        for task in (read, beats):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


async def register(
    address: tuple[str, int],
    hello: Mapping[str, Any],
    *,
    heartbeat: float = 5.0,
    on_wait: Callable[[Wait], None] | None = None,
    timeout: float | None = None,
    io_timeout: float = 10.0,
    silence: float | None = None,
    max_frame: int = wire.MAX_FRAME,
    fingerprint: str = "",
) -> SessionPlan:
    """Queue at the matchmaker at ``address`` and return this node's plan from the ``group`` frame.

    ``hello`` is :func:`crowdd.protocol.matchmaker.make_hello`'s frame (``type`` and ``proto``
    are added here if missing). ``timeout`` bounds the whole
    wait (None: wait until grouped); ``io_timeout`` bounds connecting and each write;
    ``silence`` is how long the matchmaker may send nothing before it counts as dead
    (default ``3 * heartbeat + 10`` s; it answers every heartbeat).

    The connection is TLS 1.3: the matchmaker's certificate must have ``fingerprint``
    (``[daemon] matchmaker_fingerprint``), or, when that is empty, be trusted by the system.

    Raises :class:`MatchmakerUnavailable` when the connection is refused or times out,
    :class:`MatchmakerUntrusted` when the server is not the trusted matchmaker,
    :class:`wire.RemoteError` on an error frame (``.code``, ``.field``),
    :class:`wire.ConnectionClosed` when the matchmaker hangs up, :class:`wire.FrameTimeout`
    when it goes silent or ``timeout`` passes, :class:`wire.WireError` on a malformed frame.
    """
    if heartbeat <= 0:
        raise ValueError("heartbeat must be > 0")
    host, port = address
    try:
        reader, writer = await _open(host, port, fingerprint, io_timeout)
    except asyncio.TimeoutError:
        raise MatchmakerUnavailable(f"matchmaker {host}:{port} did not answer within {io_timeout} s") from None
    except OSError as exc:
        raise MatchmakerUnavailable(f"cannot reach the matchmaker at {host}:{port}: {exc.strerror or exc}") from None
    try:
        limit = silence if silence is not None else 3 * heartbeat + 10.0
        coro = _conversation(reader, writer, hello, heartbeat, on_wait, io_timeout, max_frame, limit)
        if timeout is None:
            return await coro
        try:
            return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            raise wire.FrameTimeout(f"no group formed within {timeout} s") from None
    finally:
        await wire.close_writer(writer)


__all__ = ["MatchmakerUnavailable", "MatchmakerUntrusted", "register"]

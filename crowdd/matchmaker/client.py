"""Client side of the matchmaker protocol (docs/protocol.md): register, wait, get a group;
or, for a running session, hold it open for newcomers.

:func:`register` connects, says hello, heartbeats while it waits in the queue, reports every
``wait`` frame to ``on_wait`` and returns the ``group`` frame. Cancelling the awaiting task
closes the connection, which removes this node from the queue at once.

:class:`OpenSlots` (or :func:`keep_open`) keeps a running host's session open at the
matchmaker: it says the open hello, heartbeats, reports each newcomer (``joined``) to
``on_joined``, sends ``slots`` when :meth:`OpenSlots.set_free` changes the free count, and
reconnects with backoff whenever the matchmaker goes away, until it is cancelled.

:func:`report_expelled` tells the matchmaker that this host expelled a member of its group
(a signed ``expel`` report), so that it never places the two together again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Callable, Mapping
from typing import Any, TYPE_CHECKING

from crowdd import wire
from crowdd.errors import CrowddError
from crowdd.trust.identity import Identity, IdentityError
from crowdd.plan import PlanMember, SessionPlan
from crowdd.protocol.matchmaker import (
    MAX_REASON,
    Wait,
    check_expelled,
    check_group,
    check_joined,
    check_wait,
    make_expel,
    make_slots,
)
from crowdd.trust.tls import client_context, open_tls

if TYPE_CHECKING:  # cryptography loads when a key or certificate is used (a daemon at rest holds none)
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

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
    reader, writer = await _connect(address, fingerprint, io_timeout)
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


async def _connect(address: tuple[str, int], fingerprint: str, io_timeout: float) -> tuple[asyncio.StreamReader,
                                                                                           asyncio.StreamWriter]:
    host, port = address
    try:
        return await _open(host, port, fingerprint, io_timeout)
    except asyncio.TimeoutError:
        raise MatchmakerUnavailable(f"matchmaker {host}:{port} did not answer within {io_timeout} s") from None
    except OSError as exc:
        raise MatchmakerUnavailable(f"cannot reach the matchmaker at {host}:{port}: {exc.strerror or exc}") from None


def _check_cancelled() -> None:
    """Raise :class:`asyncio.CancelledError` if this task was asked to stop. Python 3.11's
    ``asyncio.wait_for`` swallows a cancellation that arrives as its awaitable completes, and
    a loop that only cancellation ends must not lose it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _stop(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` and wait for them, without swallowing a cancellation of the caller
    (this runs in a loop that only cancellation ends)."""
    running = [t for t in tasks if t is not None]
    for task in running:
        task.cancel()
    if running:
        await asyncio.wait(running)
    for task in running:
        if not task.cancelled():
            task.exception()  # retrieved: it ended the connection, or the connection ended it


class _NoOpenSessions(wire.WireError):
    """The matchmaker formed a new group with this host instead of holding its session open."""


class OpenSlots:
    """A running host's session held open at the matchmaker, so that newcomers join it.

    ``await run()`` until cancelled (cancelling closes the connection, which closes the session
    at the matchmaker at once). At each (re)connection it says ``hello()``: a
    :func:`crowdd.protocol.matchmaker.make_open` frame built now, carrying the session's
    current members and free count. Each newcomer the matchmaker sends to the session is
    checked (:func:`crowdd.protocol.matchmaker.check_joined`) and given to ``on_joined``.
    :meth:`set_free` tells the matchmaker the free count changed; count in it every newcomer
    ``on_joined`` has had (the matchmaker subtracts those still in flight).

    ``matchmaker()`` and ``fingerprint()`` say where the matchmaker is and its pinned
    certificate (as for :func:`register`), asked at each connection. A matchmaker that is away,
    hangs up, goes silent (``silence`` s, default ``3 * heartbeat + 10``), refuses the hello or
    sends something malformed is logged and retried after a jittered exponential backoff from
    ``retry[0]`` to ``retry[1]`` s; nothing but cancellation (or an exception from a callback)
    ends :meth:`run`.
    """

    def __init__(
        self,
        hello: Callable[[], Mapping[str, Any]],
        *,
        matchmaker: Callable[[], tuple[str, int]],
        on_joined: Callable[[PlanMember], None],
        fingerprint: Callable[[], str] = lambda: "",
        heartbeat: float = 5.0,
        on_wait: Callable[[Wait], None] | None = None,
        io_timeout: float = 10.0,
        silence: float | None = None,
        max_frame: int = wire.MAX_FRAME,
        retry: tuple[float, float] = (1.0, 30.0),
        rng: random.Random | None = None,
    ) -> None:
        if heartbeat <= 0:
            raise ValueError("heartbeat must be > 0")
        if not 0 < retry[0] <= retry[1]:
            raise ValueError("retry must be (min, max) with 0 < min <= max")
        self._hello = hello
        self._matchmaker = matchmaker
        self._fingerprint = fingerprint
        self._on_joined = on_joined
        self._on_wait = on_wait
        self.heartbeat = heartbeat
        self.io_timeout = io_timeout
        self.silence = silence if silence is not None else 3 * heartbeat + 10.0
        self.max_frame = max_frame
        self.retry = retry
        self._rng = rng or random.Random()
        self._tries = 0
        self._seen = 0  # joined frames on this connection
        self._want: tuple[int, int] | None = None  # (free, seen) not yet sent
        self._wake = asyncio.Event()
        self._open = False
        #: why the last connection ended (None while the session is open)
        self.problem: str | None = None

    @property
    def connected(self) -> bool:
        """Whether the matchmaker holds the session open now (it answered the open hello)."""
        return self._open

    def set_free(self, free: int) -> None:
        """The session has ``free`` places now (counting every newcomer ``on_joined`` has had);
        sent at once while connected, else the next hello carries it."""
        if isinstance(free, bool) or not isinstance(free, int) or free < 0:
            raise ValueError(f"free must be an integer >= 0, got {free!r}")
        self._want = (free, self._seen)
        self._wake.set()

    async def run(self) -> None:
        """Hold the session open until cancelled."""
        while True:
            address = self._matchmaker()
            delay = None
            try:
                await self._connection(address)
                why = "the matchmaker closed the connection"
            except _NoOpenSessions as exc:
                why = exc.message
                delay = self.retry[1]  # an older matchmaker groups this host anew each time: seldom
            except wire.RemoteError as exc:
                why = f"the matchmaker said {exc.code}: {exc.message}"
            except (wire.ConnectionClosed, wire.FrameTimeout, wire.WireError, OSError) as exc:
                why = str(exc) or type(exc).__name__
            finally:
                self._open = False
            _check_cancelled()
            self.problem = why
            delay = self._backoff() if delay is None else delay
            logger.warning("open session at the matchmaker %s:%d: %s; retrying in %.1f s", *address, why, delay)
            await asyncio.sleep(delay)

    def _backoff(self) -> float:
        lo, hi = self.retry
        cap = min(hi, lo * 2 ** min(self._tries, 30))
        self._tries += 1
        return self._rng.uniform(lo, cap)

    async def _connection(self, address: tuple[str, int]) -> None:
        reader, writer = await _connect(address, self._fingerprint(), self.io_timeout)
        try:
            hello = {**self._hello(), "type": "hello", "proto": wire.PROTO}
            if not isinstance(hello.get("open"), dict):
                raise ValueError("the hello of an open session is make_open()'s frame (it has no 'open')")
            self._seen = 0
            self._want = None  # the hello carries the free count now
            self._wake.clear()
            await wire.write_frame(writer, hello, timeout=self.io_timeout)
            sender = asyncio.create_task(self._send(writer))
            read: asyncio.Task[dict[str, Any]] | None = None
            try:
                while True:
                    read = asyncio.create_task(wire.read_frame(reader, timeout=self.silence, max_size=self.max_frame))
                    await asyncio.wait({read, sender}, return_when=asyncio.FIRST_COMPLETED)
                    if not read.done():
                        sender.result()  # a write failed: raise why
                    frame = await read
                    _check_cancelled()
                    self._handle(frame)
            finally:
                await _stop(read, sender)
        finally:
            await wire.close_writer(writer)

    def _handle(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "wait":
            wait = check_wait(frame)
            if not self._open:
                self._open = True
                self._tries = 0
                self.problem = None
                logger.info("the matchmaker holds this session open")
                if self._want is not None:
                    self._wake.set()  # a count set while the hello was on its way
            if self._on_wait is not None:
                self._on_wait(wait)
        elif kind == "joined":
            member = check_joined(frame)
            self._seen += 1
            logger.info("the matchmaker sends %r (%s) to this session as member %d", member.name, member.address,
                        member.index)
            self._on_joined(member)
        elif kind == "error":
            wire.raise_if_error(frame)
        elif kind == "group":
            raise _NoOpenSessions(wire.ErrorCode.BAD_FRAME, "the matchmaker formed a new group instead of holding this "
                                  "session open (it does not know open sessions)")
        else:
            raise wire.WireError(wire.ErrorCode.UNKNOWN_TYPE, f"unexpected frame {kind!r} from the matchmaker")

    async def _send(self, writer: asyncio.StreamWriter) -> None:
        """The one writer of this connection: heartbeats, and slots when the count changed
        (only once the matchmaker holds the session open: before, the hello says it)."""
        loop = asyncio.get_running_loop()
        beat = loop.time() + self.heartbeat
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, beat - loop.time()))
            self._wake.clear()
            if self._want is not None and self._open:
                free, seen = self._want
                self._want = None
                await wire.write_frame(writer, make_slots(free, seen), timeout=self.io_timeout)
            if loop.time() >= beat:
                await wire.write_frame(writer, {"type": "heartbeat"}, timeout=self.io_timeout)
                beat = loop.time() + self.heartbeat


async def keep_open(
    hello: Callable[[], Mapping[str, Any]],
    *,
    matchmaker: Callable[[], tuple[str, int]],
    on_joined: Callable[[PlanMember], None],
    fingerprint: Callable[[], str] = lambda: "",
    heartbeat: float = 5.0,
    **kw: Any,
) -> None:
    """``await OpenSlots(hello, ...).run()``: hold a running session open until cancelled."""
    await OpenSlots(hello, matchmaker=matchmaker, on_joined=on_joined, fingerprint=fingerprint, heartbeat=heartbeat,
                    **kw).run()


def _signing_key(identity: Identity) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    try:
        key = serialization.load_pem_private_key(identity.key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise IdentityError(f"{identity.key_path}: cannot sign with this key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise IdentityError(f"{identity.key_path}: the key must be ECDSA P-256 or Ed25519")
    return key


def _short(reason: str) -> str:
    """``reason`` as the report carries it: printable, at most ``MAX_REASON`` characters."""
    text = "".join(ch if ch.isprintable() else " " for ch in reason)
    return text[: MAX_REASON - 1] + "…" if len(text) > MAX_REASON else text


async def report_expelled(
    address: tuple[str, int],
    identity: Identity,
    group_id: str,
    member: str,
    reason: str = "",
    *,
    fingerprint: str = "",
    io_timeout: float = 10.0,
) -> None:
    """Tell the matchmaker at ``address`` that this host (``identity``, the one its hello
    carried) expelled ``member`` (the member's certificate fingerprint, ``PlanMember.fingerprint``)
    from its group ``group_id`` (``SessionPlan.group_id``): the matchmaker never places that
    member with this host again. ``reason`` is cut to ``MAX_REASON`` printable characters.

    The report is signed with ``identity``'s key; it goes over TLS 1.3 to the matchmaker pinned
    by ``fingerprint`` (``[daemon] matchmaker_fingerprint``; empty: the system trust store), as
    :func:`register` does. ``io_timeout`` bounds connecting, writing and the answer.

    Returns once the matchmaker confirmed. Raises :class:`MatchmakerUnavailable`,
    :class:`MatchmakerUntrusted`, :class:`wire.RemoteError` when it refused the report (``.code``
    ``unauthorized``: it placed no such group with this host; ``bad_field`` ``member``: not a
    worker it placed in that group), :class:`wire.ConnectionClosed` / :class:`wire.FrameTimeout`
    when it answered nothing, :class:`wire.WireError` on a malformed answer and
    :class:`crowdd.trust.identity.IdentityError` when the key cannot sign.
    """
    frame = make_expel(_signing_key(identity), identity.cert_pem, identity.fingerprint, group_id, member,
                       _short(reason))
    reader, writer = await _connect(address, fingerprint, io_timeout)
    try:
        await wire.write_frame(writer, frame, timeout=io_timeout)
        try:
            answer = await wire.read_frame(reader, timeout=io_timeout)
        except wire.ConnectionClosed:
            raise wire.ConnectionClosed("the matchmaker closed the connection without answering the report") from None
        if answer["type"] == "error":
            wire.raise_if_error(answer)
        if answer["type"] != "expelled":
            raise wire.WireError(wire.ErrorCode.UNKNOWN_TYPE, f"unexpected frame {answer['type']!r} from the matchmaker")
        check_expelled(answer, group_id, member)
    finally:
        await wire.close_writer(writer)


__all__ = ["MatchmakerUnavailable", "MatchmakerUntrusted", "OpenSlots", "keep_open", "register", "report_expelled"]

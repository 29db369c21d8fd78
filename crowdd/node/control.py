"""The daemon's control socket, its server side (the client: :mod:`crowdd.client.control`;
where it lives: :mod:`crowdd.protocol.endpoint`).

The CLI and the TUI talk to the daemon only through this socket, with the same wire codec
as every other crowdd connection (:mod:`crowdd.wire`), and the typed messages of
:mod:`crowdd.protocol.control`. The client's first frame carries
``"proto": "crowdd/1"``. Requests and replies:

- ``status`` → ``{"type": "status", ...}``
- ``subscribe`` → ``ok``, then a stream of ``{"type": "event", "event": KIND, ...}``
- ``donate`` (``on``) → ``{"type": "ok", "donating": bool}``
- ``host`` (``dataset``, ``job``) → ``ok`` or ``error`` bad_field naming the field. With
  ``files`` (names and sizes) the client hands over the open files instead of a path: the
  server answers ``send_files``, takes the descriptors off the socket (``SCM_RIGHTS``,
  :mod:`crowdd.data.handoff`), then ``ok``/``error``. The system service takes only this form.
- ``stop`` / ``reload`` → ``ok``
- ``pause`` (``hours``: 0 < hours <= a year) → ``{"type": "ok", "paused_until": EPOCH}``, or
  ``error`` bad_field naming ``hours``; ``resume`` → ``{"type": "ok", "paused_until": null,
  "was_paused": bool}``

Where it lives: a Unix socket (user mode: the runtime dir, mode 0600; system mode:
``/run/crowdd/control.sock``, group ``crowdd``, mode 0660), or on Windows loopback TCP plus a
random token kept in a file only the user can read (:class:`Endpoint`).

A malformed or unknown frame gets an ``error`` frame and that connection is closed; the
server keeps serving everyone else. Subscribers each have a bounded queue: publishing never
blocks the daemon; a subscriber that falls behind loses its oldest events, and one that stops
reading altogether is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import secrets
import socket
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, cast

from crowdd import wire
from crowdd.data import handoff
from crowdd.aio import cancel_and_wait
from crowdd.errors import CrowddError, InputError
from crowdd.data.handoff import Upload
from crowdd.trust.identity import Identity
from crowdd.protocol.endpoint import Endpoint, TokenFile, write_token_file
from crowdd.platform.userns import peer_pid, why_not_served
from crowdd.trust.tls import HANDSHAKE_TIMEOUT, server_context
from crowdd.protocol.control import (
    REQUEST_TYPES,
    HostRequest,
    Status,
    check_donate,
    check_host,
    check_pause,
)
from crowdd.wire import ErrorCode, WireError

logger = logging.getLogger(__name__)

SYSTEM_GROUP = "crowdd"
BODY_TIMEOUT = 10.0  # once a frame header has arrived, its body must follow within this
SUBSCRIBER_QUEUE = 256  # events buffered per subscriber before the oldest are dropped
SUBSCRIBER_WRITE_TIMEOUT = 10.0  # a subscriber that reads nothing for this long is dropped


# --------------------------------------------------------------------------- server


class ControlHandler(Protocol):
    """What the daemon offers the control socket."""

    def status(self) -> Status: ...

    async def donate(self, on: bool) -> dict[str, Any]: ...

    async def host(self, request: HostRequest) -> dict[str, Any]: ...

    async def stop(self) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...

    async def pause(self, hours: float) -> dict[str, Any]: ...

    async def resume(self) -> dict[str, Any]: ...


class _Subscriber:
    def __init__(self, writer: asyncio.StreamWriter, size: int) -> None:
        self.writer = writer
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=size)
        self.dropped = 0

    def offer(self, event: dict[str, Any]) -> None:
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
                self.queue.task_done()
            self.dropped += 1
        self.queue.put_nowait(event)


class ControlServer:
    """Serves :class:`ControlHandler` on an :class:`Endpoint`."""

    def __init__(
        self,
        handler: ControlHandler,
        endpoint: Endpoint,
        *,
        queue_size: int = SUBSCRIBER_QUEUE,
        write_timeout: float = SUBSCRIBER_WRITE_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
    ) -> None:
        self._handler = handler
        self._endpoint = endpoint
        self._queue_size = queue_size
        self._write_timeout = write_timeout
        self._body_timeout = body_timeout
        self._server: asyncio.base_events.Server | None = None
        self._subscribers: set[_Subscriber] = set()
        self._connections: set[asyncio.Task[None]] = set()
        self._token = ""
        self.port = 0

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    async def start(self, identity: Identity | None = None) -> None:
        """Serve. A TCP endpoint is TLS 1.3 presenting ``identity`` (required there); its token
        file also names the identity's fingerprint, which clients pin."""
        ep = self._endpoint
        if ep.path is not None:
            await self._start_unix(ep.path)
        else:
            if identity is None:
                raise ValueError("a TCP control endpoint needs the daemon's identity (TLS)")
            await self._start_tcp(identity)

    async def _start_unix(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self._endpoint.system:
            with contextlib.suppress(OSError):
                os.chmod(path.parent, 0o700)
        await _clear_stale_socket(path)
        mode = 0o660 if self._endpoint.system else 0o600
        old = os.umask(0o777 & ~mode)  # the socket is born with its final mode: no window
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(path))
        finally:
            os.umask(old)
        os.chmod(path, mode)
        if self._endpoint.system:
            _chgrp(path, SYSTEM_GROUP)
        logger.info("control socket listening on %s", path)

    async def _start_tcp(self, identity: Identity) -> None:
        ep = self._endpoint
        if ep.token_file is None:
            raise ValueError("a TCP control endpoint needs a token file")
        self._token = secrets.token_urlsafe(32)
        self._server = await asyncio.start_server(
            self._serve, host=ep.tcp_host, port=ep.tcp_port, ssl=server_context(identity),
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        )
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        write_token_file(ep.token_file, TokenFile(ep.tcp_host, self.port, self._token, identity.fingerprint))
        logger.info("control socket listening on %s:%d (token in %s)", ep.tcp_host, self.port, ep.token_file)

    async def close(self, flush: float = 1.0) -> None:
        """Stop serving; subscribers get what is queued (bounded by ``flush`` s) first."""
        if self._server is not None:
            self._server.close()
        drained = [sub.queue.join() for sub in self._subscribers]
        if drained:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*drained), flush)
        for sub in list(self._subscribers):
            sub.writer.close()
        await cancel_and_wait(*self._connections)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        ep = self._endpoint
        if ep.path is not None:
            with contextlib.suppress(FileNotFoundError):
                ep.path.unlink()
        elif ep.token_file is not None:
            with contextlib.suppress(FileNotFoundError):
                ep.token_file.unlink()

    def publish(self, kind: str, **fields: Any) -> None:
        """Offer one event to every subscriber; never blocks."""
        event = {"type": "event", "event": kind, **fields}
        for sub in list(self._subscribers):
            sub.offer(event)

    # ---------------------------------------------------------------- one connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await self._conversation(reader, writer)
        except CrowddError as err:
            logger.info("control client: %s", err)
            await wire.send_error_and_close(writer, err)
        except (wire.ConnectionClosed, wire.FrameTimeout, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # a handler bug must not take the socket down
            logger.exception("control request failed")
            await wire.send_error_and_close(writer, WireError(ErrorCode.INTERNAL, "internal error"))
        finally:
            await wire.close_writer(writer)
            if task is not None:
                self._connections.discard(task)

    async def _read(self, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        """One frame, or None at a clean end of stream. Idle between frames is fine."""
        try:
            header = await reader.readexactly(wire.HEADER_SIZE)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise WireError(ErrorCode.BAD_FRAME, "connection closed mid-frame") from None
            return None
        length = int.from_bytes(header, "big")
        wire.check_length(length)
        try:
            body = await asyncio.wait_for(reader.readexactly(length), self._body_timeout)
        except asyncio.IncompleteReadError:
            raise wire.ConnectionClosed("connection closed mid-frame") from None
        except asyncio.TimeoutError:
            raise wire.FrameTimeout("frame body did not arrive") from None
        frame = wire.decode_body(body)
        if frame.get("blob"):
            raise WireError(ErrorCode.BAD_FRAME, "the control socket takes no binary payloads")
        return frame

    async def _conversation(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._endpoint.path is not None:
            _refuse_jobs(writer)
        first = True
        while True:
            frame = await self._read(reader)
            if frame is None:
                return
            if first:
                wire.check_proto(frame)
                if self._token:
                    token = frame.get("token")
                    if not isinstance(token, str) or not hmac.compare_digest(token, self._token):
                        raise WireError(ErrorCode.UNAUTHORIZED, "bad or missing control token")
                first = False
            kind = frame["type"]
            if kind not in REQUEST_TYPES:
                raise WireError(ErrorCode.UNKNOWN_TYPE, f"unknown request {kind!r} (known: {', '.join(REQUEST_TYPES)})")
            if kind == "subscribe":
                await self._stream(reader, writer)
                return
            try:
                reply = await self._dispatch(kind, frame, writer)
            except CrowddError as err:
                if err.code is not ErrorCode.BAD_FIELD:
                    raise
                reply = err.to_frame()  # a well-formed request with a bad value: keep the connection
            await wire.write_frame(writer, reply, timeout=self._write_timeout)

    async def _dispatch(self, kind: str, frame: Mapping[str, Any], writer: asyncio.StreamWriter) -> dict[str, Any]:
        h = self._handler
        if kind == "status":
            return {"type": "status", **h.status()}
        if kind == "donate":
            return await h.donate(check_donate(frame))
        if kind == "pause":
            return await h.pause(check_pause(frame))
        if kind == "resume":
            return await h.resume()
        if kind == "host":
            request = check_host(frame)  # checked once, here: the daemon gets typed values
            if not request.files:
                if self._endpoint.system:
                    raise InputError("the system service opens no paths for you: hand it the files "
                                     "(`crowdd host PATH` does, with your own permissions)", field="dataset")
                return await h.host(request)
            upload = await self._receive_files(request, writer)
            try:
                return await h.host(dataclasses.replace(request, upload=upload))
            finally:
                upload.close()
        if kind == "stop":
            return await h.stop()
        return await h.reload()

    async def _receive_files(self, request: HostRequest, writer: asyncio.StreamWriter) -> Upload:
        """The open files a ``host`` request announced, passed with SCM_RIGHTS
        (:mod:`crowdd.data.handoff`): stop reading the stream, ask for them, take them off the
        socket directly, read on."""
        sock = writer.get_extra_info("socket")
        if self._endpoint.path is None or sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
            raise InputError("open files can be handed over only on a Unix control socket", field="files")
        transport = cast(asyncio.Transport, writer.transport)
        transport.pause_reading()  # the descriptors ride on the next byte: the stream must not eat it
        try:
            await wire.write_frame(writer, {"type": "send_files"}, timeout=self._write_timeout)
            raw = socket.socket(fileno=os.dup(sock.fileno()))
            try:
                raw.settimeout(self._body_timeout)
                fds = await asyncio.to_thread(handoff.receive, raw, len(request.files))
            except (OSError, TimeoutError) as exc:
                raise WireError(ErrorCode.BAD_FRAME, f"the announced files did not come ({exc})") from None
            finally:
                raw.close()
        finally:
            if not transport.is_closing():
                transport.resume_reading()
        peer = _peer(sock)
        logger.info("%d file(s) of %s handed over%s", len(fds), request.dataset, peer)
        return Upload([n for n, _ in request.files], fds, [size for _, size in request.files])

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sub = _Subscriber(writer, self._queue_size)
        await wire.write_frame(writer, {"type": "ok"}, timeout=self._write_timeout)
        sub.offer({"type": "event", "event": "status", **self._handler.status()})
        self._subscribers.add(sub)
        pump = asyncio.create_task(self._pump(sub))
        # The client sends nothing more; reading tells us when it goes away.
        watch = asyncio.create_task(reader.read(1))
        try:
            done, _ = await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch in done and not watch.cancelled() and watch.exception() is None and watch.result():
                raise WireError(ErrorCode.BAD_FRAME, "a subscription carries no requests; use another connection")
        finally:
            self._subscribers.discard(sub)
            await cancel_and_wait(pump, watch)
            if sub.dropped:
                logger.info("control subscriber fell behind: %d events dropped", sub.dropped)

    async def _pump(self, sub: _Subscriber) -> None:
        while True:
            event = await sub.queue.get()
            try:
                await wire.write_frame(sub.writer, event, timeout=self._write_timeout)
            except (wire.FrameTimeout, wire.ConnectionClosed, ConnectionError):
                logger.info("control subscriber stopped reading; disconnected")
                return
            finally:
                sub.queue.task_done()


def _refuse_jobs(writer: asyncio.StreamWriter) -> None:
    """A confined job runs as this user (its namespace's root maps to it), so the socket's mode
    lets it in: refuse a peer in another user namespace. Landlock (ABI >= 9) also stops it
    from reaching the socket at all."""
    sock = writer.get_extra_info("socket")
    why = why_not_served(sock) if sock is not None else None
    if why is not None:  # fails closed: a peer that cannot be placed is refused
        pid = peer_pid(sock)
        logger.warning("control socket: refused process %s: %s", pid, why)
        raise WireError(ErrorCode.UNAUTHORIZED, f"the control socket does not serve this process: {why}")


async def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file nobody answers on; refuse to steal one a live daemon holds."""
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; remove it or choose another --socket")
    try:
        _, w = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2.0)
    except (ConnectionRefusedError, FileNotFoundError, asyncio.TimeoutError, OSError):
        path.unlink(missing_ok=True)
        return
    w.close()
    raise FileExistsError(f"another crowdd daemon is already listening on {path}")


def _peer(sock: Any) -> str:
    """`` by uid N (pid P)`` of a Unix socket's peer, where the platform says."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return ""
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i")))
    except (OSError, struct.error):
        return ""
    return f" by uid {uid} (pid {pid})"


def _chgrp(path: Path, group: str) -> None:
    import grp  # POSIX only

    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        logger.warning("group %r does not exist; %s stays root-only (create it with sysusers.d)", group, path)
        return
    if path.stat().st_gid == gid:  # born so (the service's own group): no chown, which its syscall filter forbids
        return
    try:
        os.chown(path, -1, gid)
    except PermissionError as exc:
        logger.warning("cannot give %s to group %r: %s", path, group, exc)


__all__ = ["SYSTEM_GROUP", "ControlHandler", "ControlServer"]

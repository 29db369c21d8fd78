"""The client of a daemon's control socket (:class:`ControlClient`): the CLI, the TUI (through
:class:`crowdd.client.daemon_client.ControlDaemonClient`), launchers and tests. The exchange
and the server: :mod:`crowdd.node.control`."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from crowdd import wire
from crowdd.data import handoff
from crowdd.data.handoff import OpenFiles
from crowdd.errors import CrowddError, InputError, Unavailable
from crowdd.protocol.control import (
    make_donate,
    make_host,
    make_pause,
    make_reload,
    make_resume,
    make_status,
    make_stop,
)
from crowdd.protocol.endpoint import Endpoint, how_to_start, read_token_file
from crowdd.trust.tls import client_context, open_tls
from crowdd.wire import ErrorCode, WireError

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0  # a client's reply must come within this
HOST_TIMEOUT = 900.0  # a host request's reply waits for the dataset's conversion


class ControlClient:
    """Talks to a daemon's control socket. ``request`` raises :class:`wire.RemoteError` on an
    ``error`` reply and :class:`Unavailable` when nothing listens."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        tcp: tuple[str, int] | None = None,
        token_file: Path | None = None,
        timeout: float = REQUEST_TIMEOUT,
        system: bool = False,
    ) -> None:
        if path is None and tcp is None and token_file is None:
            raise ValueError("ControlClient needs a socket path, or a TCP address / token file")
        self._path = path
        self._tcp = tcp
        self._token_file = token_file
        self._timeout = timeout
        self._system = system
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._first: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    @classmethod
    def for_endpoint(cls, endpoint: Endpoint, **kw: Any) -> ControlClient:
        if endpoint.path is not None:
            return cls(endpoint.path, system=endpoint.system, **kw)
        return cls(token_file=endpoint.token_file, system=endpoint.system, **kw)

    def _where(self) -> str:
        if self._path is not None:
            return str(self._path)
        if self._tcp is not None:
            return f"{self._tcp[0]}:{self._tcp[1]}"
        return f"the address in {self._token_file}"

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
        """A new connection plus the fields the first frame must carry."""
        first: dict[str, Any] = {"proto": wire.PROTO}
        try:
            if self._path is not None:
                r, w = await asyncio.wait_for(asyncio.open_unix_connection(str(self._path)), self._timeout)
            else:
                host, port = self._tcp if self._tcp is not None else ("", 0)
                if self._token_file is None:
                    raise Unavailable("a TCP control client needs the daemon's token file")
                tf = read_token_file(self._token_file)
                first["token"] = tf.token
                if self._tcp is None:
                    host, port = tf.host, tf.port
                r, w = await open_tls(host, port, client_context(None), expect=tf.fingerprint, timeout=self._timeout)
        except CrowddError as exc:
            if exc.code == ErrorCode.UNAUTHORIZED:
                raise Unavailable(f"{self._where()} is not this node's daemon: {exc.message}") from None
            raise
        except (FileNotFoundError, ConnectionRefusedError, asyncio.TimeoutError, OSError) as exc:
            raise Unavailable(
                f"no crowdd daemon is running (nothing answers on {self._where()}: "
                f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__}); "
                f"{how_to_start(self._system)}"
            ) from None
        return r, w, first

    async def connect(self) -> None:
        if self._writer is None:
            self._reader, self._writer, self._first = await self._open()

    async def close(self) -> None:
        if self._writer is not None:
            await wire.close_writer(self._writer)
        self._reader = self._writer = None

    async def __aenter__(self) -> ControlClient:  # noqa: PYI034 - Python 3.10 has no typing.Self
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(self, msg: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """One request and its reply; ``timeout`` for the reply (default: the client's)."""
        async with self._lock:
            await self.connect()
            if self._reader is None or self._writer is None:
                raise Unavailable(f"not connected to {self._where()}")
            frame = {**msg, **self._first}
            try:
                await wire.write_frame(self._writer, frame, timeout=self._timeout)
                self._first = {}
                reply = await wire.read_frame(self._reader, timeout=timeout or self._timeout)
            except (wire.ConnectionClosed, wire.FrameTimeout, ConnectionError) as exc:
                await self.close()
                raise Unavailable(f"the daemon on {self._where()} went away ({exc})") from None
            except WireError:
                await self.close()
                raise
        return await self._answer(reply)

    async def status(self) -> dict[str, Any]:
        return await self.request(make_status())

    async def donate(self, on: bool) -> dict[str, Any]:
        return await self.request(make_donate(on))

    async def host(self, dataset: str, job: Mapping[str, Any], test_fraction: float | None = None,
                   model_file: str | None = None, label: str | None = None) -> dict[str, Any]:
        """Ask to host; the reply comes once the daemon has accepted (converted) or refused the dataset."""
        return await self.request(make_host(dataset, job, test_fraction, model_file, label),
                                  timeout=max(self._timeout, HOST_TIMEOUT))

    async def host_files(self, files: OpenFiles, job: Mapping[str, Any], test_fraction: float | None = None,
                         extra: Mapping[str, Any] | None = None, *, timeout: float = 3600.0) -> dict[str, Any]:
        """Host a dataset this process has opened (:func:`crowdd.data.handoff.open_dataset`): its
        descriptors go over the Unix socket; the daemon copies and converts them (``timeout``
        covers that) and answers. ``extra``: the host request's other fields (label, task, …).
        ``files`` stays open; the caller closes it."""
        if self._path is None:
            raise InputError("open files can be handed over only on a Unix control socket", field="dataset")
        frame = {**make_host(str(files.dataset), job, test_fraction, files=files.describe()), **(extra or {})}
        async with self._lock:
            await self.connect()
            if self._reader is None or self._writer is None:
                raise Unavailable(f"not connected to {self._where()}")
            try:
                await wire.write_frame(self._writer, {**frame, **self._first}, timeout=self._timeout)
                self._first = {}
                reply = await wire.read_frame(self._reader, timeout=self._timeout)
                if reply.get("type") == "send_files":
                    sock = self._writer.get_extra_info("socket")
                    raw = socket.socket(fileno=os.dup(sock.fileno()))
                    try:
                        raw.settimeout(self._timeout)
                        handoff.send(raw, files.fds)
                    finally:
                        raw.close()
                    reply = await wire.read_frame(self._reader, timeout=timeout)
            except (wire.ConnectionClosed, wire.FrameTimeout, ConnectionError) as exc:
                await self.close()
                raise Unavailable(f"the daemon on {self._where()} went away ({exc})") from None
            except WireError:
                await self.close()
                raise
        return await self._answer(reply)

    async def stop(self) -> dict[str, Any]:
        return await self.request(make_stop())

    async def reload(self) -> dict[str, Any]:
        return await self.request(make_reload())

    async def pause(self, hours: float) -> dict[str, Any]:
        """Hold donation back for ``hours``; the reply says until when (``paused_until``)."""
        return await self.request(make_pause(hours))

    async def resume(self) -> dict[str, Any]:
        return await self.request(make_resume())

    async def _answer(self, reply: dict[str, Any]) -> dict[str, Any]:
        """A reply, or its ``error`` raised (the server closes the connection after any error
        but a bad field)."""
        if reply.get("type") == "error":
            if reply.get("code") != ErrorCode.BAD_FIELD.value:
                await self.close()
            wire.raise_if_error(reply)
        return reply

    async def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        """Events from the daemon on a connection of their own, until it closes."""
        reader, writer, first = await self._open()
        try:
            await wire.write_frame(writer, {"type": "subscribe", **first}, timeout=self._timeout)
            reply = await wire.read_frame(reader, timeout=self._timeout)
            wire.raise_if_error(reply)
            while True:
                try:
                    frame = await wire.read_frame(reader, timeout=None)
                except wire.ConnectionClosed:
                    return
                wire.raise_if_error(frame)
                yield frame
        finally:
            await wire.close_writer(writer)


async def wait_for_daemon(
    client_factory: Callable[[], ControlClient], timeout: float, *, poll: float = 0.2
) -> dict[str, Any]:
    """Poll until a daemon answers ``status`` (for launchers and tests); its status, or raise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        client = client_factory()
        try:
            return await client.status()
        except Unavailable:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(poll)
        finally:
            await client.close()


__all__ = ["HOST_TIMEOUT", "REQUEST_TIMEOUT", "ControlClient", "wait_for_daemon"]

"""The daemon as a client sees it (:class:`DaemonClient`), and the adapter over the real
control socket (:class:`ControlDaemonClient`, a Unix socket or TCP + token).

The TUI takes a :class:`DaemonClient` in its constructor (a fake in widget tests; a contract
test suite holds both to the same behaviour). Every failure is one of two errors of the
catalog: :class:`crowdd.errors.Unavailable` (nothing answers, or the connection went away) and
:class:`crowdd.errors.RemoteError` (the daemon refused a request, naming the field).
This module does not import textual.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from crowdd import wire
from crowdd.client.control import ControlClient
from crowdd.protocol.endpoint import Endpoint
from crowdd.errors import ErrorCode, InputError, RemoteError, Unavailable
from crowdd.data.handoff import can_hand_over, open_dataset


logger = logging.getLogger(__name__)

START_HINT = (
    "Start it with `crowdd daemon`, or `systemctl start crowdd` for the system service "
    "(`systemctl --user start crowdd` for a user service)."
)


class DaemonClient(Protocol):
    """The daemon as the TUI sees it (the control socket's requests, as coroutines)."""

    @property
    def where(self) -> str:
        """Where the daemon is expected (shown on the 'not running' screen)."""
        ...

    async def status(self) -> dict[str, Any]: ...

    async def donate(self, on: bool) -> dict[str, Any]: ...

    async def host(self, dataset: str, job: dict[str, Any], model_file: str | None = None) -> dict[str, Any]: ...

    async def stop(self) -> dict[str, Any]: ...

    async def pause(self, hours: float) -> dict[str, Any]:
        """Hold donation back for ``hours``: ``{"type": "ok", "paused_until": EPOCH}``."""
        ...

    async def resume(self) -> dict[str, Any]:
        """End a pause: ``{"type": "ok", "paused_until": None, "was_paused": bool}``."""
        ...

    def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        """Event frames (``{"type": "event", "event": KIND, ...}``) until the connection ends."""
        ...

    async def close(self) -> None: ...


def _unavailable_types() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [
        wire.ConnectionClosed,
        wire.FrameTimeout,
        OSError,  # includes ConnectionRefusedError, FileNotFoundError, TimeoutError
        EOFError,
        asyncio.IncompleteReadError,
    ]
    kinds.append(Unavailable)
    return tuple(kinds)


def _check_reply(reply: Any) -> dict[str, Any]:
    if reply is None:  # a client method that returns nothing on success
        return {"type": "ok"}
    if not isinstance(reply, dict):
        raise RemoteError(f"unexpected reply from the daemon: {reply!r}", code=ErrorCode.BAD_FRAME)
    if reply.get("type") == "error":
        raise RemoteError.from_frame(reply)
    return reply


class ControlDaemonClient:
    """:class:`DaemonClient` over :class:`crowdd.client.control.ControlClient`, at an
    :class:`~crowdd.protocol.endpoint.Endpoint` (a Unix socket path is taken as one).

    One request connection, opened on first use and again after it breaks; requests are
    serialised on it. :meth:`subscribe` uses a connection of its own.
    """

    def __init__(self, endpoint: Endpoint | Path) -> None:
        self.endpoint = endpoint if isinstance(endpoint, Endpoint) else Endpoint(path=Path(endpoint))
        self._client: ControlClient | None = None
        self._lock = asyncio.Lock()

    @property
    def where(self) -> str:
        return self.endpoint.describe()

    def _new(self) -> ControlClient:
        return ControlClient.for_endpoint(self.endpoint)

    def _unavailable(self, exc: BaseException) -> Unavailable:
        if isinstance(exc, Unavailable):  # its message already says how to start one
            return exc
        detail = str(exc) or type(exc).__name__
        return Unavailable(f"lost the daemon on {self.where} ({detail})")

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:
                logger.debug("closing the control connection failed", exc_info=True)

    async def _call(self, name: str, *args: Any) -> dict[str, Any]:
        unavailable = _unavailable_types()
        async with self._lock:
            try:
                if self._client is None:
                    client = self._new()
                    await client.connect()
                    self._client = client
                reply = await getattr(self._client, name)(*args)
            except wire.RemoteError:
                raise
            except wire.WireError as exc:
                await self._drop()
                raise RemoteError(exc.message, field=exc.field, code=exc.code) from None
            except unavailable as exc:
                await self._drop()
                raise self._unavailable(exc) from None
        return _check_reply(reply)

    async def status(self) -> dict[str, Any]:
        return await self._call("status")

    async def donate(self, on: bool) -> dict[str, Any]:
        return await self._call("donate", on)

    async def host(self, dataset: str, job: dict[str, Any], model_file: str | None = None) -> dict[str, Any]:
        path = Path(dataset)
        if self.endpoint.path is None or not self.endpoint.system or not can_hand_over(path):
            if model_file is None:
                return await self._call("host", dataset, job)
            return await self._call("host", dataset, job, None, model_file)
        # the system service reads no paths: open the dataset here, as this user, and hand it over
        try:
            files = open_dataset(path)
        except InputError as exc:
            raise RemoteError(exc.message, field=exc.field, code=exc.code) from None
        try:
            return await self._call("host_files", files, job, None, {"model_file": model_file} if model_file else None)
        finally:
            files.close()

    async def stop(self) -> dict[str, Any]:
        return await self._call("stop")

    async def pause(self, hours: float) -> dict[str, Any]:
        return await self._call("pause", hours)

    async def resume(self) -> dict[str, Any]:
        return await self._call("resume")

    async def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        unavailable = _unavailable_types()
        client = self._new()
        try:
            try:
                async for event in client.subscribe():
                    yield _check_reply(event)
            except wire.RemoteError:
                raise
            except unavailable as exc:
                raise self._unavailable(exc) from None
        finally:
            try:
                await client.close()
            except Exception:
                logger.debug("closing the event connection failed", exc_info=True)

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


__all__ = [
    "START_HINT",
    "ControlDaemonClient",
    "DaemonClient",
]

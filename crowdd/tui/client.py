"""What the TUI needs from the daemon, and the adapter over the real control socket.

The app takes a :class:`DaemonClient` in its constructor (a fake in widget tests, a
:class:`ControlDaemonClient` otherwise). Every failure reaches the app as one of two
exceptions: :class:`DaemonUnavailableError` (nothing answers, or the connection went
away) and :class:`DaemonRequestError` (the daemon refused a request, naming the field).
This module does not import textual.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from crowdd import wire

if TYPE_CHECKING:  # pragma: no cover - typing only
    from crowdd.control import ControlClient

logger = logging.getLogger(__name__)

START_HINT = (
    "Start it with `crowdd daemon`, or `systemctl start crowdd` for the system service "
    "(`systemctl --user start crowdd` for a user service)."
)


class DaemonUnavailableError(Exception):
    """Nothing listens on the control socket, or the connection to it was lost."""


class DaemonRequestError(Exception):
    """The daemon answered a request with an error frame."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{field + ': ' if field else ''}{message}")
        self.code = code
        self.message = message
        self.field = field


class DaemonClient(Protocol):
    """The daemon as the TUI sees it (the control socket's requests, as coroutines)."""

    @property
    def where(self) -> str:
        """Where the daemon is expected (shown on the 'not running' screen)."""
        ...

    async def status(self) -> dict[str, Any]: ...

    async def donate(self, on: bool) -> dict[str, Any]: ...

    async def host(self, dataset: str, job: dict[str, Any]) -> dict[str, Any]: ...

    async def stop(self) -> dict[str, Any]: ...

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
    try:
        from crowdd.control import DaemonUnavailable
    except ImportError:  # the control module is optional for this adapter's import
        pass
    else:
        kinds.append(DaemonUnavailable)
    return tuple(kinds)


def _check_reply(reply: Any) -> dict[str, Any]:
    if reply is None:  # a client method that returns nothing on success
        return {"type": "ok"}
    if not isinstance(reply, dict):
        raise DaemonRequestError("bad_frame", f"unexpected reply from the daemon: {reply!r}")
    if reply.get("type") == "error":
        field = reply.get("field")
        raise DaemonRequestError(
            str(reply.get("code", "internal")),
            str(reply.get("message", "the daemon refused the request")),
            field if isinstance(field, str) else None,
        )
    return reply


class ControlDaemonClient:
    """:class:`DaemonClient` over :class:`crowdd.control.ControlClient` (a Unix socket).

    One request connection, opened on first use and again after it breaks; requests are
    serialised on it. :meth:`subscribe` uses a connection of its own.
    """

    def __init__(self, path: Path, *, token_file: Path | None = None) -> None:
        self.path = Path(path)
        self.token_file = token_file
        self._client: ControlClient | None = None
        self._lock = asyncio.Lock()

    @property
    def where(self) -> str:
        return str(self.path)

    def _new(self) -> ControlClient:
        from crowdd.control import ControlClient

        return ControlClient(self.path, token_file=self.token_file)

    def _unavailable(self, exc: BaseException) -> DaemonUnavailableError:
        if type(exc).__name__ == "DaemonUnavailable":  # its message already says how to start one
            return DaemonUnavailableError(str(exc))
        detail = str(exc) or type(exc).__name__
        return DaemonUnavailableError(f"lost the daemon on {self.path} ({detail})")

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
            except wire.RemoteError as exc:
                raise DaemonRequestError(exc.code, exc.message, exc.field) from None
            except wire.WireError as exc:
                await self._drop()
                raise DaemonRequestError(exc.code.value, exc.message, exc.field) from None
            except unavailable as exc:
                await self._drop()
                raise self._unavailable(exc) from None
        return _check_reply(reply)

    async def status(self) -> dict[str, Any]:
        return await self._call("status")

    async def donate(self, on: bool) -> dict[str, Any]:
        return await self._call("donate", on)

    async def host(self, dataset: str, job: dict[str, Any]) -> dict[str, Any]:
        return await self._call("host", dataset, job)

    async def stop(self) -> dict[str, Any]:
        return await self._call("stop")

    async def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        unavailable = _unavailable_types()
        client = self._new()
        try:
            try:
                async for event in client.subscribe():
                    yield _check_reply(event)
            except wire.RemoteError as exc:
                raise DaemonRequestError(exc.code, exc.message, exc.field) from None
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
    "DaemonRequestError",
    "DaemonUnavailableError",
]

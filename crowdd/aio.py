"""Small asyncio helpers shared by the daemon's servers and sessions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

logger = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None, timeout: float = 2.0) -> None:
    """Cancel tasks and wait until they are done. Python 3.11's ``wait_for`` can swallow a
    cancellation that races with completion (gh-86296), so a task that ignored the first
    cancel is cancelled again rather than awaited forever."""
    pending = {t for t in tasks if t is not None and not t.done()}
    for _ in range(5):
        if not pending:
            return
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=timeout / 5)
    if pending:
        logger.warning("%d task(s) ignored cancellation", len(pending))


def spawn_tracked(tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run ``coro`` as a task kept in ``tasks`` until it is done (a server's connections)."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


SPLICE_BUFFER = 1 << 16


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter], b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    *, buffer: int = SPLICE_BUFFER,
) -> None:
    """Copy bytes both ways between two connections until either side ends, then close both
    (a tunnel carries one TF gRPC connection; once one end is gone the other is useless)."""

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(buffer):
            dst.write(data)
            await dst.drain()

    pumps = [asyncio.create_task(pump(a[0], b[1])), asyncio.create_task(pump(b[0], a[1]))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(*pumps)
        for _, writer in (a, b):
            writer.close()
        for _, writer in (a, b):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
        for t in pumps:  # retrieve the exceptions (a reset connection is the normal end)
            if t.done() and not t.cancelled():
                t.exception()


__all__ = ["cancel_and_wait", "splice", "spawn_tracked"]


@contextlib.contextmanager
def on_signals(handlers: dict[signal.Signals, Callable[[], None]]) -> Iterator[None]:
    """Run each handler on its signal while inside (where the loop can: not on Windows)."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig, handler in handlers.items():
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
            loop.add_signal_handler(sig, handler)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)

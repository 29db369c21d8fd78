"""Start/stop logic of a service host (the Windows service), kept free of pywin32.

A service manager calls three things: *run* (blocks for the service's life), *stop* and
*shutdown*. :class:`ServiceRunner` runs the daemon entry point — a callable that takes a
:class:`threading.Event` and returns an exit status once the event is set — in a worker
thread, so the thread that called :meth:`ServiceRunner.run` stays free to answer the service
manager. :meth:`ServiceRunner.stop` first reports "stop pending" (the callback the host
passes in) and only then sets the event, as Windows expects; :meth:`shutdown` is the same.

:func:`asyncio_entry` adapts an ``async def main(stop: asyncio.Event) -> int`` daemon to the
``Callable[[threading.Event], int]`` shape: the thread-safe event is forwarded into the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

DaemonEntry = Callable[[threading.Event], int]

EXIT_CRASHED = 70  # EX_SOFTWARE: the entry point raised


class ServiceRunner:
    """Run ``run_daemon(stop_event)`` in a thread; stop it by setting the event."""

    def __init__(self, run_daemon: DaemonEntry, *, name: str = "crowdd") -> None:
        self._run_daemon = run_daemon
        self._name = name
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self.exit_code: int | None = None
        self.error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._done.is_set()

    @property
    def stop_requested(self) -> bool:
        return self.stop_event.is_set()

    def _target(self) -> None:
        try:
            code = self._run_daemon(self.stop_event)
            self.exit_code = int(code) if code is not None else 0
        except BaseException as exc:  # the host must learn of any failure, then stop cleanly
            logger.exception("%s: the daemon entry point failed", self._name)
            self.error = exc
            self.exit_code = EXIT_CRASHED
        finally:
            self._done.set()

    def start(self) -> None:
        """Start the daemon thread (once)."""
        if self._thread is not None:
            raise RuntimeError(f"{self._name}: already started")
        self._thread = threading.Thread(target=self._target, name=f"{self._name}-daemon", daemon=True)
        self._thread.start()
        logger.info("%s: daemon started", self._name)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the daemon to return; its exit status, or None if ``timeout`` ran out."""
        if self._thread is None:
            raise RuntimeError(f"{self._name}: not started")
        if not self._done.wait(timeout):
            return None
        self._thread.join()
        return self.exit_code

    def run(self) -> int:
        """Start and block until the daemon returns (the service's *run* callback)."""
        self.start()
        self._done.wait()
        code = EXIT_CRASHED if self.exit_code is None else self.exit_code
        if not self.stop_requested and code != 0:
            logger.error("%s: the daemon exited with status %d without being asked to stop", self._name, code)
        return code

    def stop(self, report_pending: Callable[[], None] | None = None) -> None:
        """Report "stop pending" first, then ask the daemon to stop. Safe to call repeatedly."""
        if report_pending is not None:
            try:
                report_pending()
            except Exception:
                logger.exception("%s: reporting stop-pending failed", self._name)
        if not self.stop_event.is_set():
            logger.info("%s: stop requested", self._name)
        self.stop_event.set()

    shutdown = stop  # system shutdown: the same as a stop


def asyncio_entry(main: Callable[[asyncio.Event], Awaitable[int]]) -> DaemonEntry:
    """Adapt ``async main(stop: asyncio.Event) -> int`` to a ``(threading.Event) -> int`` entry."""

    def entry(stop: threading.Event) -> int:
        async def runner() -> int:
            loop = asyncio.get_running_loop()
            aio_stop = asyncio.Event()
            finished = threading.Event()

            def forward() -> None:
                while not stop.wait(0.1):
                    if finished.is_set():
                        return
                if not loop.is_closed():
                    try:
                        loop.call_soon_threadsafe(aio_stop.set)
                    except RuntimeError:  # the loop closed meanwhile
                        pass

            threading.Thread(target=forward, name="stop-forwarder", daemon=True).start()
            try:
                return await main(aio_stop)
            finally:
                finished.set()  # releases the forwarder if main returned on its own

        return asyncio.run(runner())

    return entry

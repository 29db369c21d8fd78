"""The service host's start/stop logic (what the Windows service runs), off Windows."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from crowdd.platform.windows_service import EXIT_CRASHED, ServiceRunner, asyncio_entry

ROOT = Path(__file__).resolve().parents[2]


def _blocking_daemon(started: threading.Event) -> object:
    def run(stop: threading.Event) -> int:
        started.set()
        stop.wait(60)
        return 0 if stop.is_set() else 3

    return run


def test_run_blocks_until_stop_and_reports_pending_first() -> None:
    started = threading.Event()
    runner = ServiceRunner(_blocking_daemon(started))  # type: ignore[arg-type]
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(runner.run()))
    t.start()
    try:
        assert started.wait(10) and runner.running
        order: list[str] = []
        runner.stop(report_pending=lambda: order.append(f"pending, event set={runner.stop_event.is_set()}"))
        assert order == ["pending, event set=False"]  # STOP_PENDING went out before the event
        t.join(10)
        assert result == [0] and not runner.running and runner.stop_requested
    finally:
        runner.stop()
        t.join(10)


def test_shutdown_is_stop() -> None:
    assert ServiceRunner.shutdown is ServiceRunner.stop
    started = threading.Event()
    runner = ServiceRunner(_blocking_daemon(started))  # type: ignore[arg-type]
    runner.start()
    assert started.wait(10)
    runner.shutdown()
    assert runner.wait(10) == 0


def test_stop_before_start_and_twice() -> None:
    runner = ServiceRunner(lambda stop: 0 if stop.is_set() else 5)
    runner.stop()
    runner.stop()
    assert runner.run() == 0


def test_daemon_exits_on_its_own_with_error(caplog: pytest.LogCaptureFixture) -> None:
    runner = ServiceRunner(lambda stop: 4)
    assert runner.run() == 4
    assert "without being asked to stop" in caplog.text


def test_daemon_raises() -> None:
    def boom(stop: threading.Event) -> int:
        raise OSError("port in use")

    runner = ServiceRunner(boom)
    assert runner.run() == EXIT_CRASHED
    assert isinstance(runner.error, OSError)


def test_failing_report_still_stops() -> None:
    started = threading.Event()
    runner = ServiceRunner(_blocking_daemon(started))  # type: ignore[arg-type]
    runner.start()
    assert started.wait(10)

    def bad_report() -> None:
        raise RuntimeError("SCM gone")

    runner.stop(report_pending=bad_report)
    assert runner.wait(10) == 0


def test_misuse() -> None:
    runner = ServiceRunner(lambda stop: 0)
    with pytest.raises(RuntimeError, match="not started"):
        runner.wait(0)
    runner.start()
    with pytest.raises(RuntimeError, match="already started"):
        runner.start()
    assert runner.wait(10) == 0


def test_asyncio_entry_serves_until_stopped() -> None:
    """A real asyncio server on loopback, stopped from another thread through the event."""
    port: list[int] = []
    ready = threading.Event()

    async def main(stop: asyncio.Event) -> int:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        try:
            await stop.wait()
        finally:
            server.close()
            await server.wait_closed()
        return 0

    runner = ServiceRunner(asyncio_entry(main))
    runner.start()
    try:
        assert ready.wait(10)
        with socket.create_connection(("127.0.0.1", port[0]), timeout=5):
            pass
    finally:
        runner.stop()
    assert runner.wait(10) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port[0]), timeout=2).close()


def test_asyncio_entry_returning_by_itself() -> None:
    async def main(stop: asyncio.Event) -> int:
        return 7

    runner = ServiceRunner(asyncio_entry(main))
    assert runner.run() == 7 and not runner.stop_requested


def test_windows_service_module_imports_off_windows() -> None:
    """packaging/windows/service.py must import without pywin32 and expose its pure parts."""
    spec = importlib.util.spec_from_file_location("crowdd_win_service", ROOT / "packaging/windows/service.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert "win32serviceutil" not in sys.modules
    assert mod.SERVICE_NAME == "crowdd"
    paths = mod.service_paths(Path("C:/ProgramData/crowdd"))
    assert paths.runtime_dir == Path("C:/ProgramData/crowdd/run")
    if sys.platform != "win32":
        with pytest.raises(SystemExit, match="only on Windows"):
            mod.main([])


def _load_service_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("crowdd_win_service_entry", ROOT / "packaging/windows/service.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(120)
def test_windows_entry_runs_the_real_daemon(tmp_path: Path) -> None:
    """The Windows service's entry point on Linux: the real daemon, loopback TCP + token file,
    answering status until the stop event is set."""
    from crowdd.client.control import ControlClient

    mod = _load_service_module()
    runner = ServiceRunner(mod.daemon_entry(tmp_path, tcp=True))
    runner.start()
    try:
        token = tmp_path / "run" / "control.token"
        deadline = time.monotonic() + 60
        while not token.exists() and runner.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert token.exists(), f"no token file (daemon exit {runner.exit_code}, error {runner.error!r})"

        async def ask() -> dict[str, object]:
            client = ControlClient(token_file=token)
            await client.connect()
            try:
                return await client.status()
            finally:
                await client.close()

        st = asyncio.run(ask())
        assert st["state"] == "off" and st["donating"] is False
    finally:
        runner.stop()
    assert runner.wait(60) == 0
    assert not runner.running

"""The TUI against a real ``crowdd daemon`` over its real control socket.

(a) the app, driven by Pilot, with the real :class:`ControlDaemonClient`: toggle donation
and see the daemon's state change; (b) ``crowdd tui`` in a real terminal (tmux): press
``d`` and see "Donation ON" on the screen.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Label

from crowdd.errors import RemoteError, Unavailable
from crowdd.client.daemon_client import ControlDaemonClient
from crowdd.trust.identity import Identity


def _daemon_missing() -> str | None:
    try:
        importlib.import_module("crowdd.node.daemon")
    except ImportError as exc:
        return f"crowdd.node.daemon cannot be imported yet ({exc})"
    return None


_MISSING = _daemon_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _wait(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {what}")


def _status(sock: Path) -> dict[str, Any] | None:
    async def ask() -> dict[str, Any] | None:
        client = ControlDaemonClient(sock)
        try:
            return await client.status()
        except Unavailable:
            return None
        finally:
            await client.close()

    return asyncio.run(ask())


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Path]:
    """A real matchmaker and a real daemon below ``tmp_path``; yields the control socket."""
    root = tmp_path / "node"
    logs = tmp_path / "logs"
    logs.mkdir()
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    try:
        mm_state = tmp_path / "matchmaker"
        fingerprint = Identity.load_or_create(mm_state, "matchmaker").fingerprint  # the one it will serve
        root.mkdir()
        (root / "crowdd.toml").write_text(f'[daemon]\nmatchmaker_fingerprint = "{fingerprint}"\n')
        mm_out = (logs / "matchmaker.log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "crowdd", "matchmaker", "--listen", f"127.0.0.1:{port}", "--root", str(mm_state),
             "--state-dir", str(mm_state)],
            stdout=mm_out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        ))
        d_out = (logs / "daemon.log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "crowdd", "daemon", "--root", str(root), "--matchmaker", f"127.0.0.1:{port}"],
            stdout=d_out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        ))
        sock = root / "run" / "control.sock"

        def up() -> bool:
            if procs[-1].poll() is not None:
                raise AssertionError(f"the daemon exited: {(logs / 'daemon.log').read_text()[-2000:]}")
            return sock.exists() and _status(sock) is not None

        _wait(up, "the daemon's control socket", timeout=60)
        yield sock
    finally:
        for proc in reversed(procs):
            _stop(proc)


# ---------------------------------------------------------------------------- (a) Pilot, real socket


async def _ask(sock: Path) -> dict[str, Any]:
    client = ControlDaemonClient(sock)
    try:
        return await client.status()
    finally:
        await client.close()


async def _until(pilot: Pilot[Any], cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for: {what}")


async def test_toggle_donation_on_a_real_daemon(daemon: Path) -> None:
    from crowdd.tui.app import CrowddApp
    from crowdd.tui.screens import MainScreen

    before = await _ask(daemon)
    assert before["donating"] is False and before["state"] == "off"
    app = CrowddApp(ControlDaemonClient(daemon), poll_interval=1.0, retry_interval=0.5)
    async with app.run_test(size=(100, 30)) as pilot:
        await _until(pilot, lambda: app.view.connected and isinstance(app.screen, MainScreen), "connected")
        state = app.main_screen.query_one("#state", Label)
        assert str(state.content) == "off"
        await pilot.press("d")
        await _until(pilot, lambda: app.view.donating and app.view.state != "off", "donation on, state changed")
        assert not state.has_class("state-off")
        after = await _ask(daemon)
        assert after["donating"] is True
        assert after["state"] != "off"
        log = " ".join(line.text for line in app.main_screen.query_one("#log").lines)  # type: ignore[attr-defined]
        assert "off →" in log  # the daemon's state event reached the log
        await pilot.press("d")
        await _until(pilot, lambda: not app.view.donating and app.view.state == "off", "donation off again")
    final = await _ask(daemon)
    assert final["donating"] is False and final["state"] == "off"

    # the daemon's refusals reach the app as RemoteError naming the field
    client = ControlDaemonClient(daemon)
    try:
        with pytest.raises(RemoteError) as exc:
            await client.host(str(daemon.parent / "missing.npz"), {})
        assert exc.value.field == "dataset" and "no such file" in exc.value.message
        with pytest.raises(RemoteError) as exc:
            await client.host(str(daemon.parent), {"workers": 99_999})
        assert exc.value.field == "workers"
        assert (await client.status())["state"] == "off"  # the connection survives a refusal
    finally:
        await client.close()


# ---------------------------------------------------------------------------- (b) a real terminal


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_crowdd_tui_in_tmux(daemon: Path, tmp_path: Path) -> None:
    server = f"crowdd-tui-{uuid.uuid4().hex[:8]}"  # our own tmux server: nothing shared
    tmux = ["tmux", "-L", server]
    command = f"{sys.executable} -m crowdd tui --socket {daemon}; sleep 30"

    def screen() -> str:
        out = subprocess.run([*tmux, "capture-pane", "-p", "-t", "tui"], check=False, capture_output=True, text=True, timeout=10)
        return out.stdout

    env = {**os.environ, "TERM": "xterm-256color"}
    subprocess.run([*tmux, "new-session", "-d", "-s", "tui", "-x", "100", "-y", "30", command],
                   check=True, env=env, timeout=10)
    try:
        _wait(lambda: "Donation OFF" in screen(), "the TUI showing donation off", timeout=60)
        assert "off" in screen()
        subprocess.run([*tmux, "send-keys", "-t", "tui", "d"], check=True, timeout=10)
        _wait(lambda: "Donation ON" in screen(), "the TUI showing donation on", timeout=30)
        status = _status(daemon)
        assert status is not None and status["donating"] is True
        subprocess.run([*tmux, "send-keys", "-t", "tui", "q"], check=True, timeout=10)
        _wait(lambda: "Donation" not in screen(), "the TUI quitting", timeout=30)
        # quitting leaves the daemon running
        status = _status(daemon)
        assert status is not None and status["donating"] is True
    finally:
        subprocess.run([*tmux, "kill-server"], check=False, capture_output=True, timeout=10)

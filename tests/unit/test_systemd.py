"""sd_notify against real AF_UNIX datagram sockets (path and abstract)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from crowdd.platform.systemd import Notifier

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs AF_UNIX sockets")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, str(path)
    finally:
        sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    if not sys.platform.startswith("linux"):
        pytest.skip("abstract sockets are Linux only")
    name = f"crowdd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        yield sock, "@" + name
    finally:
        sock.close()


def recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_status_stopping_on_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    try:
        assert n.enabled
        assert n.ready()
        assert recv(sock) == ["READY=1"]
        assert n.status("training\nepoch 2/5")
        assert recv(sock) == ["STATUS=training epoch 2/5"]  # one line, as the protocol needs
        assert n.ready("waiting")
        assert recv(sock) == ["READY=1", "STATUS=waiting"]
        assert n.stopping()
        assert recv(sock) == ["STOPPING=1"]
    finally:
        n.close()


def test_abstract_socket(abstract_listener: tuple[socket.socket, str]) -> None:
    sock, name = abstract_listener
    n = Notifier.from_env({"NOTIFY_SOCKET": name})
    try:
        assert n.ready()
        assert recv(sock) == ["READY=1"]
    finally:
        n.close()


def test_no_notify_socket_is_a_noop() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.watchdog_interval is None
    assert n.ready() is False
    assert n.status("x") is False
    assert n.stopping() is False
    assert n.watchdog() is False


def test_unusable_address_disables(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert "sd_notify disabled" in caplog.text


def test_gone_socket_logs_and_does_not_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    try:
        assert n.ready() is False
        assert "sd_notify READY failed" in caplog.text
    finally:
        n.close()


def test_bad_line_is_rejected(listener: tuple[socket.socket, str]) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": listener[1]})
    try:
        with pytest.raises(ValueError, match="KEY=VALUE"):
            n.notify("READY=1\nSTOPPING=1")
        with pytest.raises(ValueError, match="KEY=VALUE"):
            n.notify("READY")
    finally:
        n.close()


def test_env_is_cleaned_for_children(listener: tuple[socket.socket, str]) -> None:
    env = dict(os.environ, NOTIFY_SOCKET=listener[1], WATCHDOG_USEC="4000000", WATCHDOG_PID=str(os.getpid()))
    n = Notifier.from_env(env)
    try:
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            assert var not in env
        # a real child started with that environment sees none of them
        out = subprocess.run(
            [sys.executable, "-c", "import os; print(sorted(k for k in os.environ if k.startswith(('NOTIFY', 'WATCHDOG'))))"],
            env=env, capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()
        assert out == "[]"
        assert n.ready()  # the notifier itself still works
        assert recv(listener[0]) == ["READY=1"]
    finally:
        n.close()


def test_default_environ_is_os_environ(listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener[1])
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    n = Notifier.from_env()
    try:
        assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
        assert n.watchdog_interval == pytest.approx(1.0)
    finally:
        n.close()


def test_watchdog_interval_and_ping(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    try:
        assert n.watchdog_interval == pytest.approx(15.0)
        assert n.watchdog()
        assert recv(sock) == ["WATCHDOG=1"]
    finally:
        n.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "10000000"}, 5.0),  # no WATCHDOG_PID: it is ours
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, None),  # another process's watchdog
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "me"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_cases(listener: tuple[socket.socket, str], env: dict[str, str], expected: float | None) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": listener[1], **env}, pid=4242 if env.get("WATCHDOG_PID") == "1" else None)
    try:
        assert n.watchdog_interval == (pytest.approx(expected) if expected is not None else None)
        if expected is None:
            assert n.watchdog() is False
    finally:
        n.close()


def test_no_watchdog_without_notify_socket() -> None:
    n = Notifier.from_env({"WATCHDOG_USEC": "10000000"})
    assert n.watchdog_interval is None

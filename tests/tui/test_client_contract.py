"""One contract for every DaemonClient: the fake the widget tests use and the real adapter
over a real daemon's control socket (Unix socket, and TCP + token) must behave alike."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from crowdd.client.daemon_client import ControlDaemonClient, DaemonClient
from crowdd.config import Config, Paths
from crowdd.protocol.endpoint import Endpoint
from crowdd.errors import ErrorCode, RemoteError, Unavailable
from crowdd.idle.policy import AlwaysIdle
from crowdd.node.daemon import Daemon
from crowdd.protocol.control import STATUS_KEYS
from fake_client import FakeDaemonClient

pytestmark = pytest.mark.timeout(60)
KINDS = ("fake", "unix", "tcp")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def client_of(kind: str, tmp_path: Path) -> AsyncIterator[DaemonClient]:
    if kind == "fake":
        fake = FakeDaemonClient()
        yield fake
        await fake.close()
        return
    cfg = Config()
    cfg.daemon.listen_host = "127.0.0.1"
    paths = Paths.under(tmp_path / "node")
    endpoint = Endpoint.for_paths(paths, tcp=(kind == "tcp"))
    # no matchmaker listens: donation on just keeps it registering, which is all we need
    daemon = Daemon(cfg, paths, endpoint=endpoint, matchmaker=("127.0.0.1", _closed_port()),
                    policy=AlwaysIdle(), name="contract", policy_interval=0.2)
    await daemon.start()
    client = ControlDaemonClient(endpoint)
    try:
        yield client
    finally:
        await client.close()
        await daemon.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_status_has_the_schema(kind: str, tmp_path: Path) -> None:
    async with client_of(kind, tmp_path) as c:
        st = await c.status()
        assert st["type"] == "status"
        assert set(STATUS_KEYS) <= set(st)
        assert st["state"] == "off" and st["donating"] is False


@pytest.mark.parametrize("kind", KINDS)
async def test_donate_round_trips(kind: str, tmp_path: Path) -> None:
    async with client_of(kind, tmp_path) as c:
        assert await c.donate(True) == {"type": "ok", "donating": True}
        assert (await c.status())["donating"] is True
        assert await c.donate(False) == {"type": "ok", "donating": False}
        assert (await c.status())["donating"] is False


@pytest.mark.parametrize("kind", KINDS)
async def test_stop_answers_ok(kind: str, tmp_path: Path) -> None:
    async with client_of(kind, tmp_path) as c:
        assert (await c.stop())["type"] == "ok"


@pytest.mark.parametrize("kind", KINDS)
async def test_a_bad_job_is_refused_naming_the_field(kind: str, tmp_path: Path) -> None:
    async with client_of(kind, tmp_path) as c:
        with pytest.raises(RemoteError) as err:
            await c.host(str(tmp_path), {"learning_rate": -1})
        assert err.value.code is ErrorCode.BAD_FIELD and err.value.field == "learning_rate"
        assert (await c.status())["role"] is None  # nothing changed


@pytest.mark.parametrize("kind", KINDS)
async def test_subscribe_starts_with_the_status(kind: str, tmp_path: Path) -> None:
    async with client_of(kind, tmp_path) as c:
        events = c.subscribe()
        first: dict[str, Any] = await events.__anext__()
        assert first["type"] == "event" and first["event"] == "status" and "state" in first
        await events.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", KINDS)
async def test_no_daemon_is_unavailable(kind: str, tmp_path: Path) -> None:
    if kind == "fake":
        client: DaemonClient = FakeDaemonClient(available=False)
    elif kind == "unix":
        client = ControlDaemonClient(tmp_path / "nobody.sock")
    else:
        client = ControlDaemonClient(Endpoint(path=None, token_file=tmp_path / "no.token"))
    try:
        with pytest.raises(Unavailable):
            await client.status()
        with pytest.raises(Unavailable):
            await client.donate(True)
    finally:
        await client.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_pause_and_resume_round_trip(kind: str, tmp_path: Path) -> None:
    async with client_of(kind, tmp_path) as c:
        before = time.time()
        reply = await c.pause(2.0)
        assert reply["type"] == "ok"
        until = reply["paused_until"]
        assert before + 7200 - 5 <= until <= time.time() + 7200 + 5
        st = await c.status()
        assert st["idle"]["paused_until"] == pytest.approx(until)
        assert await c.resume() == {"type": "ok", "paused_until": None, "was_paused": True}
        assert (await c.status())["idle"]["paused_until"] is None
        assert await c.resume() == {"type": "ok", "paused_until": None, "was_paused": False}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hours", [0, -1.5, 24 * 365 + 1, float("nan"), "2h", True])
async def test_a_bad_pause_is_refused_naming_hours(kind: str, hours: Any, tmp_path: Path) -> None:
    async with client_of(kind, tmp_path) as c:
        await c.pause(1.0)
        kept = (await c.status())["idle"]["paused_until"]
        with pytest.raises(RemoteError) as err:
            await c.pause(hours)
        assert err.value.code is ErrorCode.BAD_FIELD and err.value.field == "hours"
        assert (await c.status())["idle"]["paused_until"] == pytest.approx(kept)  # nothing lost

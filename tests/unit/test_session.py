"""The group session channel: auth, fan-out, end, heartbeats both ways (no TensorFlow)."""

from __future__ import annotations

import asyncio
import secrets
import socket
from typing import Any

import pytest

from crowdd import auth
from crowdd.node.session import (
    PURPOSE,
    HostLost,
    HostSession,
    Member,
    SessionRefused,
    WorkerSession,
    dead_after,
)

pytestmark = pytest.mark.timeout(30)

HB = 0.1
DEAD = 0.6


def group(n_workers: int = 2) -> dict[str, Any]:
    members = [{"index": 0, "role": "host", "name": "h", "address": "127.0.0.1", "ports": {"tf": [1, 2]}}]
    members += [{"index": i, "role": "worker", "name": f"w{i}", "address": "127.0.0.1", "ports": {"tf": [3]}}
                for i in range(1, n_workers + 1)]
    return {"group_id": "g", "token": secrets.token_hex(32), "index": 0, "members": members,
            "dataset": {"size": 1000, "digest": "0" * 64, "name": "d"}}


def listener() -> socket.socket:
    s = socket.create_server(("127.0.0.1", 0))
    s.setblocking(False)
    return s


async def host_session(g: dict[str, Any], **kw: Any) -> tuple[HostSession, int, list[Member | None]]:
    changes: list[Member | None] = []
    sock = listener()
    port = sock.getsockname()[1]
    hs = HostSession(g, sock, heartbeat=HB, dead_after=DEAD, on_change=changes.append, **kw)
    await hs.start()
    return hs, port, changes


def worker(port: int, token: str, index: int, inbox: list[dict[str, Any]]) -> WorkerSession:
    return WorkerSession("127.0.0.1", port, token, index, heartbeat=HB, dead_after=DEAD, on_message=inbox.append)


def test_dead_after_fits_the_peer_timeout() -> None:
    assert dead_after(5.0, 15.0) == 10.0
    assert dead_after(1.0, 2.0) == 2.0


async def test_full_conversation() -> None:
    g = group(2)
    hs, port, changes = await host_session(g)
    inboxes: list[list[dict[str, Any]]] = [[], []]
    ws = [worker(port, g["token"], i, inboxes[i - 1]) for i in (1, 2)]
    try:
        for w in ws:
            await w.connect(retry_for=5)
        runs = [asyncio.create_task(w.run()) for w in ws]
        for w in ws:
            w.send({"type": "replication", "done": 500, "total": 1000, "source": 0})
            w.send({"type": "ready"})
        ready = await asyncio.wait_for(hs.wait_ready(), 5)
        assert [m.index for m in ready] == [1, 2]
        assert all(m.done == m.total == 1000 for m in ready)
        for m in ready:
            hs.send(m.index, {"type": "train", "index": m.index, "cluster": {"ps": [], "worker": []}})
        for w in ws:
            w.send({"type": "job", "event": "started"})
        started = await hs.wait_started(ready, 5)
        assert len(started) == 2
        hs.broadcast({"type": "progress", "step": 7})
        await asyncio.sleep(3 * HB)  # pings flow both ways meanwhile; nobody is dropped
        assert all(m.alive for m in hs.workers)
        await hs.end({"test_accuracy": 0.9, "model_path": "/m", "error": None})
        ends = await asyncio.wait_for(asyncio.gather(*runs), 5)
        assert all(e["test_accuracy"] == 0.9 for e in ends)
        for inbox in inboxes:
            kinds = [m["type"] for m in inbox]
            assert kinds[0] == "members" and "train" in kinds and "progress" in kinds
        assert any(c is not None and c.state == "training" for c in changes)
    finally:
        for w in ws:
            await w.close()
        await hs.close()


async def test_wrong_token_and_bad_index_are_refused() -> None:
    g = group(1)
    hs, port, _ = await host_session(g)
    try:
        with pytest.raises(SessionRefused):
            await worker(port, secrets.token_hex(32), 1, []).connect(retry_for=1)
        for index in (0, 5):
            reader, writer, _ = await auth.connect("127.0.0.1", port, g["token"], PURPOSE, {"index": index})
            from crowdd import wire

            frame = await wire.read_frame(reader, timeout=5)
            assert frame["type"] == "error" and frame["field"] == "index"
            writer.close()
        assert hs.members[1].alive and not hs.members[1].connected
    finally:
        await hs.close()


async def test_silent_worker_is_dropped_and_absent_worker_too() -> None:
    g = group(2)
    hs, port, _ = await host_session(g, join_timeout=0.5)
    try:
        # worker 1 joins and then falls silent (no pings): the host gives it up
        _reader, writer, _ = await auth.connect("127.0.0.1", port, g["token"], PURPOSE, {"index": 1})
        live = await asyncio.wait_for(hs.wait_ready(), 5)  # worker 2 never joins: dropped at join_timeout
        assert live == [] or all(m.index == 1 for m in live)
        for _ in range(100):
            if not hs.members[1].alive:
                break
            await asyncio.sleep(0.05)
        assert [m.state for m in hs.workers] == ["gone", "gone"]
        assert await asyncio.wait_for(hs.wait_ready(), 1) == []
        writer.close()
    finally:
        await hs.close()


async def test_silent_host_is_lost_within_dead_after() -> None:
    token = secrets.token_hex(32)

    async def mute_host(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await auth.accept(reader, writer, token, PURPOSE)
        await asyncio.sleep(30)  # never a ping

    server = await asyncio.start_server(mute_host, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    w = worker(port, token, 1, [])
    try:
        await w.connect(retry_for=2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(HostLost, match="silent"):
            await asyncio.wait_for(w.run(), 5)
        assert loop.time() - t0 < DEAD + 1.0
    finally:
        await w.close()
        server.close()


async def test_host_that_closes_is_lost_at_once() -> None:
    g = group(1)
    hs, port, _ = await host_session(g)
    w = worker(port, g["token"], 1, [])
    await w.connect(retry_for=2)
    run = asyncio.create_task(w.run())
    await asyncio.sleep(0.1)
    await hs.close()  # no end frame: the connection just goes
    with pytest.raises(HostLost):
        await asyncio.wait_for(run, 2)
    await w.close()


async def test_unreachable_host_is_refused_after_retrying() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SessionRefused, match="cannot join"):
        await worker(port, secrets.token_hex(32), 1, []).connect(retry_for=0.5)

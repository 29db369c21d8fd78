"""The group session channel: auth, fan-out, end, heartbeats both ways (no TensorFlow)."""

from __future__ import annotations

import asyncio
import secrets
import socket
from typing import Any

import pytest

from crowdd import auth
from crowdd.hyperparams import GroupSettings, Job
from crowdd.plan import DatasetRef, MemberPorts, PlanMember, SessionPlan
from crowdd.protocol.session import End, HostMessage, MembersUpdate, Train, TrainingEvent
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


def group(n_workers: int = 2, *, port: int = 1, token: str | None = None, index: int = 0) -> SessionPlan:
    members = [PlanMember(0, "host", "h", "127.0.0.1", MemberPorts(1, port, (1, 2)))]
    members += [PlanMember(i, "worker", f"w{i}", "127.0.0.1", MemberPorts(1, 2, (3,))) for i in range(1, n_workers + 1)]
    return SessionPlan("g", token or secrets.token_hex(32), index, tuple(members), Job(),
                       DatasetRef("0" * 64, 1000, "d"), GroupSettings())


def listener() -> socket.socket:
    s = socket.create_server(("127.0.0.1", 0))
    s.setblocking(False)
    return s


async def host_session(g: SessionPlan, **kw: Any) -> tuple[HostSession, int, list[Member | None]]:
    changes: list[Member | None] = []
    sock = listener()
    port = sock.getsockname()[1]
    hs = HostSession(g, sock, heartbeat=HB, dead_after=DEAD, on_change=changes.append, **kw)
    await hs.start()
    return hs, port, changes


def worker(port: int, token: str, index: int, inbox: list[HostMessage]) -> WorkerSession:
    plan = group(max(index, 1), port=port, token=token, index=index)
    return WorkerSession(plan, heartbeat=HB, dead_after=DEAD, on_message=inbox.append)


def test_dead_after_fits_the_peer_timeout() -> None:
    assert dead_after(5.0, 15.0) == 10.0
    assert dead_after(1.0, 2.0) == 2.0


async def test_full_conversation() -> None:
    g = group(2)
    hs, port, changes = await host_session(g)
    inboxes: list[list[HostMessage]] = [[], []]
    ws = [worker(port, g.token, i, inboxes[i - 1]) for i in (1, 2)]
    try:
        for w in ws:
            await w.connect(retry_for=5)
        runs = [asyncio.create_task(w.run()) for w in ws]
        for w in ws:
            w.report_replication(500, 1000, 0)
            w.ready()
        ready = await asyncio.wait_for(hs.wait_ready(), 5)
        assert [m.index for m in ready] == [1, 2]
        assert all(m.done == m.total == 1000 for m in ready)
        cluster = {"ps": ["127.0.0.1:1"], "worker": ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]}
        for m in ready:
            hs.start_training(m, cluster, m.index)
        for w in ws:
            w.job_started()
        started = await hs.wait_started(ready, 5)
        assert len(started) == 2
        hs.fan_out({"event": "progress", "step": 7})
        await asyncio.sleep(3 * HB)  # pings flow both ways meanwhile; nobody is dropped
        assert all(m.alive for m in hs.workers)
        await hs.end(End(0.9, "/m"))
        ends = await asyncio.wait_for(asyncio.gather(*runs), 5)
        assert all(e.test_accuracy == 0.9 for e in ends)
        for w_index, inbox in enumerate(inboxes, 1):
            assert isinstance(inbox[0], MembersUpdate) and len(inbox[0].members) == 3
            trains = [m for m in inbox if isinstance(m, Train)]
            assert [t.index for t in trains] == [w_index] and trains[0].cluster == cluster
            events = [m.event for m in inbox if isinstance(m, TrainingEvent)]
            assert events == [{"event": "progress", "step": 7}]  # the job's own key, end to end
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
            reader, writer, _ = await auth.connect("127.0.0.1", port, g.token, PURPOSE, {"index": index})
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
        _reader, writer, _ = await auth.connect("127.0.0.1", port, g.token, PURPOSE, {"index": 1})
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
    w = worker(port, g.token, 1, [])
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


async def test_worker_sending_a_malformed_frame_is_dropped() -> None:
    """A malicious worker's garbage (a bad replication report) retires it; the host goes on."""
    g = group(1)
    hs, port, _ = await host_session(g)
    try:
        reader, writer, _ = await auth.connect("127.0.0.1", port, g.token, PURPOSE, {"index": 1})
        from crowdd import wire

        await wire.write_frame(writer, {"type": "replication", "done": 10, "total": 5})
        for _ in range(100):
            if not hs.members[1].alive:
                break
            await asyncio.sleep(0.02)
        assert hs.members[1].state == "gone"
        writer.close()
    finally:
        await hs.close()


async def test_host_sending_a_malformed_frame_is_lost() -> None:
    token = secrets.token_hex(32)

    async def bad_host(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from crowdd import wire

        await auth.accept(reader, writer, token, PURPOSE)
        await wire.write_frame(writer, {"type": "train", "cluster": {"ps": []}, "index": 1})
        await asyncio.sleep(5)

    server = await asyncio.start_server(bad_host, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    inbox: list[HostMessage] = []
    w = worker(port, token, 1, inbox)
    try:
        await w.connect(retry_for=2)
        with pytest.raises(HostLost, match="bad frame"):
            await asyncio.wait_for(w.run(), 5)
        assert inbox == []
    finally:
        await w.close()
        server.close()

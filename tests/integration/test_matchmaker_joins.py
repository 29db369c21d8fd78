"""Open sessions on loopback: a running host holds its session open (OpenSlots) and newcomers
that register() join it, over TLS, with a real Matchmaker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from crowdd import wire
from crowdd.config import MatchmakerConfig
from crowdd.hyperparams import GroupSettings, Job
from crowdd.matchmaker.server import Matchmaker
from crowdd.matchmaker.client import OpenSlots, keep_open
from crowdd.matchmaker.client import register as _register
from crowdd.plan import DatasetRef, MemberPorts, PlanMember, SessionPlan
from crowdd.protocol import matchmaker as mmp
from crowdd.protocol.matchmaker import Wait
from crowdd.testing.identities import identity, matchmaker_tls
from crowdd.testing.slow_listener import SlowListener
from crowdd.trust.tls import client_context

pytestmark = pytest.mark.timeout(60)

MM_TLS, MM_FP = matchmaker_tls()
GID = "0123456789abcdef"
TOKEN = "ab" * 32
JOB = Job(workers=3, min_workers=1, wait=60.0, epochs=2)
DATASET = DatasetRef("cd" * 32, 1234, "digits")
SETTINGS = GroupSettings(route="chain")
HOST_PORTS = MemberPorts(7001, 7002, (7003, 7004))


def _who(name: str) -> dict[str, Any]:
    ident = identity(name)
    return {"cert": ident.cert_pem, "fingerprint": ident.fingerprint}


def host_hello(name: str = "h", ports: MemberPorts = HOST_PORTS, **kw: Any) -> dict[str, Any]:
    return mmp.make_hello("host", name, ports, job=JOB, dataset=DATASET, settings=SETTINGS, **_who(name), **kw)


def worker_hello(name: str, *, data_port: int = 8001, **kw: Any) -> dict[str, Any]:
    return mmp.make_hello("worker", name, MemberPorts(data_port, 8002, (8003,)), **_who(name), **kw)


def member(index: int, name: str) -> PlanMember:
    ports = HOST_PORTS if index == 0 else MemberPorts(8000 + index, 8100 + index, (8200 + index,))
    return PlanMember(index, "host" if index == 0 else "worker", name, "127.0.0.1", ports, **_who(name))


SESSION = (member(0, "h"), member(1, "gone"))


def register(mm: Matchmaker, hello: dict[str, Any], **kw: Any) -> Awaitable[SessionPlan]:
    return _register(mm.address, hello, fingerprint=MM_FP, heartbeat=0.2, **kw)


MakeServer = Callable[..., Awaitable[Matchmaker]]


@pytest.fixture
async def make_server() -> AsyncIterator[MakeServer]:
    servers: list[Matchmaker] = []

    async def make(port: int = 0, **overrides: Any) -> Matchmaker:
        base = {"read_timeout": 5.0, "heartbeat_timeout": 10.0, "status_interval": 0.2, "check_reachable": False}
        mm = Matchmaker(dataclasses.replace(MatchmakerConfig(), **{**base, **overrides}), wait_interval=0.05)
        await mm.start("127.0.0.1", port, MM_TLS)
        servers.append(mm)
        return mm

    try:
        yield make
    finally:
        for mm in servers:
            await mm.close()


@pytest.fixture
async def server(make_server: MakeServer) -> Matchmaker:
    return await make_server()


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


class Host:
    """A running session's host as the daemon keeps it: its members, its free count, and an
    OpenSlots that rebuilds the open hello from them at each connection."""

    def __init__(self, mm: Matchmaker, free: int, members: tuple[PlanMember, ...] = SESSION, name: str = "h",
                 hello: dict[str, Any] | None = None, heartbeat: float = 0.2) -> None:
        self.members = list(members)
        self.free = free
        self.joined: list[PlanMember] = []
        self.hellos = 0
        self.mm = mm
        self._hello = hello or host_hello(name)
        self.slots = OpenSlots(self.hello, matchmaker=lambda: self.mm.address, fingerprint=lambda: MM_FP,
                               on_joined=self.on_joined, heartbeat=heartbeat, retry=(0.05, 0.2))
        self.task = asyncio.create_task(self.slots.run())

    def hello(self) -> dict[str, Any]:
        self.hellos += 1
        return mmp.make_open(self._hello, GID, TOKEN, self.members, self.free)

    def on_joined(self, m: PlanMember) -> None:
        self.joined.append(m)
        self.members.append(m)
        self.free -= 1

    async def opened(self) -> Host:
        await until(lambda: self.slots.connected)
        return self

    async def leave(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def raw_frames(mm: Matchmaker, *frames: dict[str, Any]) -> list[dict[str, Any]]:
    """Send frames on a raw TLS connection; every frame back until an error or the close."""
    reader, writer = await asyncio.open_connection(*mm.address, ssl=client_context(None))
    try:
        for frame in frames:
            await wire.write_frame(writer, frame)
        got: list[dict[str, Any]] = []
        while not got or got[-1]["type"] != "error":
            try:
                got.append(await wire.read_frame(reader, timeout=10))
            except wire.ConnectionClosed:
                break
        return got
    finally:
        writer.close()


def hello_frame(frame: dict[str, Any]) -> dict[str, Any]:
    return {**frame, "type": "hello", "proto": wire.PROTO}


# --------------------------------------------------------------------------- joining


async def test_a_newcomer_joins_the_open_session(server: Matchmaker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="crowdd.matchmaker")
    host = await Host(server, free=2).opened()
    assert server.stats()["open"] == 1 and server.stats()["hosts"] == 0
    plan = await asyncio.wait_for(register(server, worker_hello("newcomer")), 10)
    assert plan.joining and plan.index == len(SESSION) == 2
    assert (plan.group_id, plan.token) == (GID, TOKEN)
    assert plan.members[:2] == SESSION
    assert plan.members[0].cert == identity("h").cert_pem and plan.host.fingerprint == identity("h").fingerprint
    assert plan.me.name == "newcomer" and plan.me.fingerprint == identity("newcomer").fingerprint
    assert plan.me.address == "127.0.0.1" and plan.me.ports == MemberPorts(8001, 8002, (8003,))
    assert plan.job == JOB and plan.dataset == DATASET and plan.settings == SETTINGS
    await until(lambda: len(host.joined) == 1)
    assert host.joined == [plan.me]
    assert server.stats()["joins"] == 1 and server.stats()["open"] == 1 and server.stats()["groups"] == 0
    joins = [r.getMessage() for r in caplog.records if " joins session " in r.getMessage()]
    assert len(joins) == 1 and "'newcomer'" in joins[0] and GID in joins[0] and "member 2" in joins[0]
    assert not host.task.done() and host.hellos == 1  # still open, on the same connection
    await host.leave()


async def test_a_waiting_worker_joins_when_a_session_opens(server: Matchmaker) -> None:
    waits: list[Wait] = []
    worker = asyncio.create_task(register(server, worker_hello("early"), on_wait=waits.append))
    await until(lambda: bool(waits))
    host = Host(server, free=1)
    plan = await asyncio.wait_for(worker, 10)
    assert plan.joining and plan.index == 2
    await until(lambda: host.joined == [plan.me])
    await host.leave()


async def test_a_full_session_takes_nobody_until_it_has_room_again(server: Matchmaker) -> None:
    host = await Host(server, free=1).opened()
    first = await asyncio.wait_for(register(server, worker_hello("first")), 10)
    await until(lambda: len(host.joined) == 1)
    waits: list[Wait] = []
    second = asyncio.create_task(register(server, worker_hello("second"), on_wait=waits.append))
    await until(lambda: bool(waits))
    await asyncio.sleep(0.3)
    assert not second.done() and server.stats()["workers"] == 1
    host.free += 1  # someone left the session
    host.slots.set_free(host.free)
    plan = await asyncio.wait_for(second, 10)
    assert plan.joining and plan.index == first.index + 1 == 3
    assert plan.members[2] == first.me  # the session as it stands, the first newcomer included
    await until(lambda: [m.name for m in host.joined] == ["first", "second"])
    await host.leave()


async def test_tags_apply_to_open_sessions(server: Matchmaker) -> None:
    host = await Host(server, free=2, hello=host_hello(tag="lab")).opened()
    waits: list[Wait] = []
    elsewhere = asyncio.create_task(register(server, worker_hello("elsewhere", want_tag="gpu"), on_wait=waits.append))
    lab = await asyncio.wait_for(register(server, worker_hello("lab", want_tag="lab")), 10)
    assert lab.joining and lab.index == 2
    assert waits and not elsewhere.done()
    elsewhere.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await elsewhere
    await host.leave()


# --------------------------------------------------------------------------- closing, refusing


async def test_the_session_is_gone_once_its_host_disconnects(server: Matchmaker) -> None:
    host = await Host(server, free=3).opened()
    await host.leave()
    await until(lambda: server.stats()["open"] == 0)
    waits: list[Wait] = []
    later = asyncio.create_task(register(server, worker_hello("later"), on_wait=waits.append))
    await until(lambda: bool(waits))
    assert waits[0].position == 1 and waits[0].workers == 1
    await asyncio.sleep(0.3)
    assert not later.done()  # it waits in the queue for a new group
    group = await asyncio.wait_for(register(server, mmp.make_hello(
        "host", "next", HOST_PORTS, job=Job(workers=1), dataset=DATASET, settings=SETTINGS, **_who("next"))), 10)
    plan = await asyncio.wait_for(later, 10)
    assert not plan.joining and plan.index == 1 and plan.group_id == group.group_id != GID


async def test_a_host_cannot_claim_another_hosts_session(server: Matchmaker) -> None:
    host = await Host(server, free=2).opened()
    claim = mmp.make_open(host_hello("intruder"), GID, TOKEN, SESSION, 2)  # h's members, intruder's certificate
    frames = await raw_frames(server, hello_frame(claim))
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "bad_field"
    assert frames[-1]["field"] == "open.members[0].cert"
    # nor the same session id with its own certificate
    own = mmp.make_open(host_hello("intruder"), GID, TOKEN, (member(0, "intruder"),), 2)
    frames = await raw_frames(server, hello_frame(own))
    assert frames[-1]["field"] == "open.group_id"
    assert server.stats()["open"] == 1
    plan = await asyncio.wait_for(register(server, worker_hello("w")), 10)
    assert plan.host.fingerprint == identity("h").fingerprint
    await host.leave()


async def test_a_refused_open_hello_is_retried_not_raised(server: Matchmaker) -> None:
    intruder = Host(server, free=1, hello=host_hello("intruder"))  # SESSION is h's
    await until(lambda: intruder.hellos >= 3)
    assert not intruder.task.done() and not intruder.slots.connected
    assert intruder.slots.problem is not None and "bad_field" in intruder.slots.problem
    assert server.stats()["open"] == 0
    await intruder.leave()


async def test_slots_and_heartbeats_are_checked(server: Matchmaker) -> None:
    worker = hello_frame(worker_hello("w"))
    frames = await raw_frames(server, worker, mmp.make_slots(1, 0))
    assert frames[-1]["code"] == "bad_frame" and "slots" in frames[-1]["message"]
    opened = hello_frame(mmp.make_open(host_hello(), GID, TOKEN, SESSION, 1))
    frames = await raw_frames(server, opened, {"type": "heartbeat"}, mmp.make_slots(1, 1))
    assert [f["type"] for f in frames] == ["wait", "wait", "error"]
    assert frames[-1]["field"] == "seen"  # nobody was sent to it yet
    frames = await raw_frames(server, opened, {"type": "slots", "free": -1, "seen": 0})
    assert frames[-1]["field"] == "free"
    await until(lambda: server.stats()["open"] == 0)


async def test_a_silent_open_host_is_dropped(make_server: MakeServer) -> None:
    mm = await make_server(heartbeat_timeout=0.6)
    kept = await Host(mm, free=1, heartbeat=0.1).opened()
    reader, writer = await asyncio.open_connection(*mm.address, ssl=client_context(None))
    other = (member(0, "quiet"),)
    await wire.write_frame(writer, hello_frame(mmp.make_open(host_hello("quiet"), "fedcba9876543210", TOKEN, other, 1)))
    assert (await wire.read_frame(reader, timeout=10))["type"] == "wait"
    await until(lambda: mm.stats()["open"] == 2)
    await until(lambda: mm.stats()["open"] == 1 and mm.stats()["dropped"] == 1)
    writer.close()
    await asyncio.sleep(0.8)
    assert kept.slots.connected and mm.stats()["open"] == 1  # heartbeats keep it
    await kept.leave()


async def test_admission_limits_count_open_sessions(make_server: MakeServer) -> None:
    mm = await make_server(max_clients=1)
    host = await Host(mm, free=1).opened()
    with pytest.raises(wire.RemoteError) as info:
        await asyncio.wait_for(register(mm, worker_hello("w")), 10)
    assert info.value.code == "busy"
    await host.leave()


# --------------------------------------------------------------------------- reachability


async def test_an_unreachable_open_host_is_refused_and_a_reachable_one_opens(make_server: MakeServer) -> None:
    mm = await make_server(check_reachable=True, reach_timeout=1.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = int(s.getsockname()[1])
    frames = await raw_frames(mm, hello_frame(mmp.make_open(
        host_hello(ports=MemberPorts(closed, 7002, (7003, 7004))), GID, TOKEN, SESSION, 1)))
    assert frames[-1]["code"] == "unreachable"
    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = int(listening.getsockname()[1])
        host = await Host(mm, free=1, hello=host_hello(ports=MemberPorts(port, 7002, (7003, 7004)))).opened()
        natd = await asyncio.wait_for(register(mm, worker_hello("natd", data_port=closed)), 10)
    assert natd.joining and natd.me.reachable is False
    await until(lambda: host.joined == [natd.me])
    await host.leave()


async def checking(mm: Matchmaker) -> None:
    """Until the matchmaker is connecting back to a hello's data port."""
    await until(lambda: any(c.state == "checking" for c in mm.conns.values()))


async def test_a_count_set_while_the_hello_is_checked_goes_out_once_open(make_server: MakeServer) -> None:
    mm = await make_server(check_reachable=True, reach_timeout=10.0)
    with SlowListener() as slow:  # the connect-back is in flight until released
        host = Host(mm, free=0, heartbeat=30.0,  # no heartbeat carries it meanwhile
                    hello=host_hello(ports=MemberPorts(slow.port, 7002, (7003, 7004))))
        await until(lambda: host.hellos == 1)
        await checking(mm)
        host.free = 1
        host.slots.set_free(1)
        slow.release()
        await host.opened()
    plan = await asyncio.wait_for(register(mm, worker_hello("w")), 5)
    assert plan.joining and plan.index == 2
    await host.leave()


async def test_slots_sent_while_the_hello_is_checked_apply_once_open(make_server: MakeServer) -> None:
    mm = await make_server(check_reachable=True, reach_timeout=10.0)
    with SlowListener() as slow:
        reader, writer = await asyncio.open_connection(*mm.address, ssl=client_context(None))
        hello = host_hello(ports=MemberPorts(slow.port, 7002, (7003, 7004)))
        await wire.write_frame(writer, hello_frame(mmp.make_open(hello, GID, TOKEN, SESSION, 0)))
        await checking(mm)
        await wire.write_frame(writer, mmp.make_slots(1, 0))
        slow.release()
        assert (await wire.read_frame(reader, timeout=10))["type"] == "wait"
    plan = await asyncio.wait_for(register(mm, worker_hello("w")), 10)
    assert plan.joining and plan.index == 2
    frame = await wire.read_frame(reader, timeout=10)
    while frame["type"] == "wait":
        frame = await wire.read_frame(reader, timeout=10)
    assert frame["type"] == "joined" and mmp.check_joined(frame) == plan.me
    writer.close()


# --------------------------------------------------------------------------- reconnecting


async def test_the_host_reopens_its_session_after_the_matchmaker_restarts(make_server: MakeServer) -> None:
    mm = await make_server()
    host = await Host(mm, free=2).opened()
    first = await asyncio.wait_for(register(mm, worker_hello("first")), 10)
    await until(lambda: len(host.joined) == 1)
    port = mm.address[1]
    await mm.close()
    await until(lambda: not host.slots.connected)
    mm2 = await make_server(port=port)
    host.mm = mm2
    await host.opened()
    assert host.hellos == 2 and mm2.stats()["open"] == 1
    second = await asyncio.wait_for(register(mm2, worker_hello("second")), 10)
    # the reopened hello carried the session as it stood: the first newcomer is member 2
    assert second.index == 3 and second.members[2] == first.me
    await until(lambda: [m.name for m in host.joined] == ["first", "second"])
    await host.leave()


async def test_keep_open_retries_while_the_matchmaker_is_away() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    calls = 0

    def where() -> tuple[str, int]:
        nonlocal calls
        calls += 1
        return ("127.0.0.1", port)

    task = asyncio.create_task(keep_open(lambda: mmp.make_open(host_hello(), GID, TOKEN, SESSION, 1), matchmaker=where,
                                         on_joined=lambda m: None, fingerprint=lambda: MM_FP, heartbeat=0.2,
                                         retry=(0.02, 0.05)))
    await until(lambda: calls >= 3)
    assert not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_hello_without_open_is_a_bug(server: Matchmaker) -> None:
    """A plain host hello would queue the host for a new group: OpenSlots refuses to send it."""
    slots = OpenSlots(host_hello, matchmaker=lambda: server.address, fingerprint=lambda: MM_FP, on_joined=lambda m: None)
    with pytest.raises(ValueError, match="make_open"):
        await asyncio.wait_for(slots.run(), 10)
    assert server.stats()["hosts"] == 0 and server.stats()["groups"] == 0
    with pytest.raises(ValueError):
        slots.set_free(-1)
    with pytest.raises(ValueError):
        OpenSlots(host_hello, matchmaker=lambda: server.address, on_joined=lambda m: None, heartbeat=0)


async def _fake_matchmaker(*replies: dict[str, Any]) -> tuple[asyncio.Server, list[dict[str, Any]]]:
    """A TLS server that answers each hello with ``replies``, then holds the connection."""
    hellos: list[dict[str, Any]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hellos.append(await wire.read_frame(reader))
        for reply in replies:
            await wire.write_frame(writer, reply)
        with contextlib.suppress(Exception, asyncio.CancelledError):  # it ends with the test
            while True:
                await wire.read_frame(reader, timeout=30)

    return await asyncio.start_server(serve, "127.0.0.1", 0, ssl=MM_TLS), hellos


async def _opening(srv: asyncio.Server, retry: tuple[float, float]) -> tuple[OpenSlots, asyncio.Task[None]]:
    address = srv.sockets[0].getsockname()[:2]
    slots = OpenSlots(lambda: mmp.make_open(host_hello(), GID, TOKEN, SESSION, 1), matchmaker=lambda: address,
                      fingerprint=lambda: MM_FP, on_joined=lambda m: None, heartbeat=0.2, retry=retry)
    return slots, asyncio.create_task(slots.run())


async def test_a_malformed_joined_frame_is_logged_and_the_session_reopened() -> None:
    bad = mmp.make_joined(member(2, "newcomer"))
    bad["member"]["index"] = 0
    srv, hellos = await _fake_matchmaker(mmp.make_wait(1, 0, 0), bad)
    try:
        slots, task = await _opening(srv, (0.01, 0.02))
        await until(lambda: slots.problem is not None and "member.index" in slots.problem)
        await until(lambda: len(hellos) >= 2)  # and it opened the session again
        assert not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        srv.close()


async def test_a_matchmaker_that_groups_the_host_anew_is_asked_seldom() -> None:
    """An older matchmaker ignores `open` and forms a new group with the host: each try would
    take workers into a group nobody leads, so the client waits its longest delay."""
    group = mmp.make_join(GID, TOKEN, (*SESSION, member(2, "taken")), JOB, DATASET.to_dict(), SETTINGS)
    srv, hellos = await _fake_matchmaker({**group, "index": 0, "join": False})
    try:
        slots, task = await _opening(srv, (0.01, 1.0))
        await until(lambda: slots.problem is not None)
        assert "new group" in slots.problem
        await asyncio.sleep(0.5)
        assert len(hellos) == 1 and not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        srv.close()

"""A host expels a member and tells the matchmaker (report_expelled), over TLS on loopback:
the two are never placed together again; nobody else can make that happen."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from crowdd import wire
from crowdd.config import MatchmakerConfig
from crowdd.hyperparams import GroupSettings, Job
from crowdd.matchmaker.server import Matchmaker
from crowdd.matchmaker.client import OpenSlots, report_expelled
from crowdd.matchmaker.client import register as _register
from crowdd.plan import DatasetRef, MemberPorts, SessionPlan
from crowdd.protocol import matchmaker as mmp
from crowdd.testing.identities import identity, matchmaker_tls
from crowdd.trust.tls import client_context

pytestmark = pytest.mark.timeout(60)

MM_TLS, MM_FP = matchmaker_tls()
DATASET = DatasetRef("cd" * 32, 1234, "digits")
HOST_PORTS = MemberPorts(7001, 7002, (7003, 7004))


def host_hello(name: str, workers: int) -> dict[str, Any]:
    ident = identity(name)
    return mmp.make_hello("host", name, HOST_PORTS, job=Job(workers=workers, min_workers=1, wait=60.0),
                          dataset=DATASET, settings=GroupSettings(), cert=ident.cert_pem, fingerprint=ident.fingerprint)


def worker_hello(name: str) -> dict[str, Any]:
    ident = identity(name)
    return mmp.make_hello("worker", name, MemberPorts(8001, 8002, (8003,)), cert=ident.cert_pem,
                          fingerprint=ident.fingerprint)


def fp(name: str) -> str:
    return identity(name).fingerprint


def key(name: str) -> Any:
    return serialization.load_pem_private_key(identity(name).key_path.read_bytes(), password=None)


@pytest.fixture
async def server() -> AsyncIterator[Matchmaker]:
    base = {"read_timeout": 5.0, "heartbeat_timeout": 10.0, "status_interval": 0.2, "check_reachable": False}
    mm = Matchmaker(dataclasses.replace(MatchmakerConfig(), **base), wait_interval=0.05)
    await mm.start("127.0.0.1", 0, MM_TLS)
    try:
        yield mm
    finally:
        await mm.close()


def register(mm: Matchmaker, hello: dict[str, Any]) -> asyncio.Task[SessionPlan]:
    return asyncio.create_task(_register(mm.address, hello, fingerprint=MM_FP, heartbeat=0.2))


def report(mm: Matchmaker, reporter: str, group_id: str, member: str, reason: str = "") -> Awaitable[None]:
    return report_expelled(mm.address, identity(reporter), group_id, fp(member), reason, fingerprint=MM_FP)


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def waiting(mm: Matchmaker, hosts: int, workers: int) -> None:
    """Until that many wait, then a moment more: no group may form from them."""
    await until(lambda: (mm.stats()["hosts"], mm.stats()["workers"]) == (hosts, workers))
    await asyncio.sleep(0.3)
    assert (mm.stats()["hosts"], mm.stats()["workers"]) == (hosts, workers)


async def cancel(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def raw_frames(mm: Matchmaker, *frames: dict[str, Any]) -> list[dict[str, Any]]:
    """Send frames on a raw TLS connection; every frame back until an error or the close."""
    reader, writer = await asyncio.open_connection(*mm.address, ssl=client_context(None))
    try:
        for frame in frames:
            await wire.write_frame(writer, frame)
        got: list[dict[str, Any]] = []
        while not got or got[-1]["type"] not in ("error", "expelled"):
            try:
                got.append(await wire.read_frame(reader, timeout=10))
            except wire.ConnectionClosed:
                break
        return got
    finally:
        writer.close()


async def first_group(mm: Matchmaker) -> SessionPlan:
    """Host h and workers a, b grouped; h's plan."""
    host = register(mm, host_hello("h", 2))
    a, b = register(mm, worker_hello("a")), register(mm, worker_hello("b"))
    plan, *_ = await asyncio.wait_for(asyncio.gather(host, a, b), 10)
    assert sorted(m.name for m in plan.members) == ["a", "b", "h"]
    return plan


# --------------------------------------------------------------------------- the host reports


async def test_an_expelled_worker_is_not_placed_with_that_host_again(server: Matchmaker) -> None:
    plan = await first_group(server)
    await report(server, "h", plan.group_id, "a", "changes failed validation 5 times")
    assert server.stats()["expelled"] == 1 and server.stats()["banned"] == 1
    host, a = register(server, host_hello("h", 1)), register(server, worker_hello("a"))
    await waiting(server, 1, 1)
    b = register(server, worker_hello("b"))
    got = await asyncio.wait_for(host, 10)
    assert [m.name for m in got.members] == ["h", "b"] and (await b).group_id == got.group_id
    assert not a.done()
    other = register(server, host_hello("h2", 1))  # a is welcome elsewhere
    assert [m.name for m in (await asyncio.wait_for(other, 10)).members] == ["h2", "a"]
    assert (await a).host.fingerprint == fp("h2")


async def test_an_open_session_takes_no_expelled_newcomer(server: Matchmaker) -> None:
    plan = await first_group(server)
    await report(server, "h", plan.group_id, "a")
    # h's next session (not the one a was in, whose member list would keep a out anyway)
    gid, token = "fedcba9876543210", "cd" * 32
    joined: list[str] = []
    members = [plan.host]

    def on_joined(m: Any) -> None:
        joined.append(m.name)
        members.append(m)

    slots = OpenSlots(lambda: mmp.make_open(host_hello("h", 2), gid, token, members, 2),
                      matchmaker=lambda: server.address, fingerprint=lambda: MM_FP, on_joined=on_joined,
                      heartbeat=0.2, retry=(0.05, 0.2))
    opener = asyncio.create_task(slots.run())
    try:
        await until(lambda: slots.connected)
        a = register(server, worker_hello("a"))
        await waiting(server, 0, 1)
        c = await asyncio.wait_for(register(server, worker_hello("c")), 10)
        assert c.joining and c.group_id == gid and c.me.name == "c"
        await until(lambda: joined == ["c"])
        assert not a.done()
        # a newcomer the matchmaker sent counts as placed in that group: its host may expel it
        await report(server, "h", gid, "c", "NaN changes")
        assert server.stats()["banned"] == 2
        await cancel(a)
    finally:
        await cancel(opener)


# --------------------------------------------------------------------------- nobody else


async def refused(server: Matchmaker, code: wire.ErrorCode, field: str, coro: Awaitable[None]) -> None:
    with pytest.raises(wire.RemoteError) as exc:
        await asyncio.wait_for(coro, 10)
    assert (exc.value.code, exc.value.field) == (code, field)


async def test_only_the_groups_host_can_report_a_member_of_it(server: Matchmaker) -> None:
    plan = await first_group(server)
    gid = plan.group_id
    unauthorized, bad = wire.ErrorCode.UNAUTHORIZED, wire.ErrorCode.BAD_FIELD
    await refused(server, unauthorized, "group_id", report(server, "b", gid, "a"))  # a member, not the host
    await refused(server, unauthorized, "group_id", report(server, "outsider", gid, "a"))
    await refused(server, unauthorized, "group_id", report(server, "h", "fedcba9876543210", "a"))  # no such group
    await refused(server, bad, "member", report(server, "h", gid, "outsider"))  # not in the group
    await refused(server, bad, "member", report(server, "h", gid, "h"))
    # b has h's certificate (the group frame carries it), not its key
    forged = mmp.make_expel(key("b"), identity("h").cert_pem, fp("h"), gid, fp("a"), "")
    got = await raw_frames(server, forged)
    assert [(f["type"], f.get("code"), f.get("field")) for f in got] == [("error", "unauthorized", "signature")]
    assert server.stats()["banned"] == 0 and server.stats()["expelled"] == 0
    # none of that had an effect: h and a are grouped again
    host, a = register(server, host_hello("h", 1)), register(server, worker_hello("a"))
    got_plan = await asyncio.wait_for(host, 10)
    assert [m.name for m in got_plan.members] == ["h", "a"]
    await a


async def test_a_report_is_the_only_frame_of_its_connection(server: Matchmaker) -> None:
    plan = await first_group(server)
    frame = mmp.make_expel(key("h"), identity("h").cert_pem, fp("h"), plan.group_id, fp("a"), "")
    got = await raw_frames(server, {**worker_hello("x"), "type": "hello", "proto": wire.PROTO}, frame)
    assert got[-1]["type"] == "error" and got[-1]["code"] == "bad_frame"
    assert server.stats()["banned"] == 0
    assert await raw_frames(server, frame) == [mmp.make_expelled(plan.group_id, fp("a"))]
    assert server.stats()["banned"] == 1

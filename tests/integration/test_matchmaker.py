"""The matchmaker on loopback with real clients (the library client and raw TLS sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from crowdd import wire
from crowdd.config import MatchmakerConfig
from crowdd.plan import SessionPlan
from crowdd.protocol.matchmaker import Wait
from crowdd.matchmaker import handshakes
from crowdd.matchmaker import server as mm_module
from crowdd.matchmaker.server import Matchmaker
from crowdd.matchmaker.client import MatchmakerUnavailable, MatchmakerUntrusted
from crowdd.matchmaker.client import register as _register
from crowdd.testing.slow_listener import SlowListener
from crowdd.testing.identities import hello_identity, identity, matchmaker_tls
from crowdd.trust.tls import client_context

pytestmark = pytest.mark.timeout(60)

MM_TLS, MM_FP = matchmaker_tls()


def register(address: tuple[str, int], hello: dict[str, Any], **kw: Any) -> Awaitable[SessionPlan]:
    """The library client, pinning the test matchmaker's certificate unless told otherwise."""
    kw.setdefault("fingerprint", MM_FP)
    return _register(address, hello, **kw)

DIGEST = "ab" * 32


def host_hello(name: str = "h", *, tag: str = "", want_tag: str = "", **job: Any) -> dict[str, Any]:
    return {
        "role": "host",
        "name": name,
        "ports": {"data": 7001, "session": 7002, "tf": [7003, 7004]},
        "tag": tag,
        "want_tag": want_tag,
        "job": {"workers": 1, "min_workers": 1, "wait": 60, **job},
        "dataset": {"digest": DIGEST, "size": 1234, "name": "digits"},
        **hello_identity(name),
    }


def worker_hello(name: str = "w", *, tag: str = "", want_tag: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "role": "worker",
        "name": name,
        "ports": {"data": 8001, "session": 8002, "tf": [8003]},
        "tag": tag,
        "want_tag": want_tag,
        **hello_identity(name),
        **extra,
    }


MakeServer = Callable[..., Awaitable[Matchmaker]]


@pytest.fixture
async def make_server() -> AsyncIterator[MakeServer]:
    servers: list[Matchmaker] = []

    async def make(**overrides: Any) -> Matchmaker:
        # nothing listens on the hellos' ports: reachability has its own tests
        base = {"read_timeout": 5.0, "heartbeat_timeout": 10.0, "status_interval": 0.2, "check_reachable": False}
        cfg = dataclasses.replace(MatchmakerConfig(), **{**base, **overrides})
        mm = Matchmaker(cfg, wait_interval=0.05)
        await mm.start("127.0.0.1", 0, MM_TLS)
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


class Waiting:
    """A client task that registers and records its wait frames."""

    def __init__(self, mm: Matchmaker, hello: dict[str, Any], **kw: Any) -> None:
        self.waits: list[Wait] = []
        self.first_wait = asyncio.Event()
        self.task = asyncio.create_task(register(mm.address, hello, on_wait=self._on_wait, **kw))

    def _on_wait(self, frame: Wait) -> None:
        self.waits.append(frame)
        self.first_wait.set()

    async def queued(self) -> Waiting:
        await asyncio.wait_for(self.first_wait.wait(), 10)
        return self

    async def group(self) -> SessionPlan:
        return await asyncio.wait_for(self.task, 10)

    async def leave(self) -> None:
        """Cancel the registration and wait until it has closed its connection."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def queue(mm: Matchmaker, hello: dict[str, Any], **kw: Any) -> Waiting:
    return await Waiting(mm, hello, **kw).queued()


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def raw(
    mm: Matchmaker, local_ip: str | None = None, *, tls: bool = True
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection: TLS 1.3 (not checking the certificate), or plaintext with ``tls=False``."""
    kw: dict[str, Any] = {"local_addr": (local_ip, 0)} if local_ip else {}
    if tls:
        kw["ssl"] = client_context(None)
    return await asyncio.open_connection(*mm.address, **kw)


async def read_until_closed(reader: asyncio.StreamReader) -> list[dict[str, Any]]:
    """Every frame the server sends until it closes the connection, or until its last frame
    (``error`` or ``group``: after it, the server waits for the client to close, as TLS
    cannot half-close)."""
    frames = []
    while True:
        try:
            frames.append(await wire.read_frame(reader, timeout=10))
        except wire.ConnectionClosed:
            return frames
        if frames[-1]["type"] in ("error", "group"):
            return frames


def raw_hello(hello: dict[str, Any]) -> dict[str, Any]:
    return {**hello, "type": "hello", "proto": wire.PROTO}


# --------------------------------------------------------------------------- grouping


async def test_host_and_worker_get_the_same_group(server: Matchmaker) -> None:
    w = await queue(server, worker_hello("w1"))
    assert w.waits[0].position == 1
    h = Waiting(server, host_hello("h1", epochs=3))
    hg, wg = await h.group(), await w.group()
    assert hg.index == 0 and wg.index == 1
    assert dataclasses.replace(hg, index=0) == dataclasses.replace(wg, index=0)
    assert len(hg.token) == 64 and int(hg.token, 16) >= 0
    assert [m.role for m in hg.members] == ["host", "worker"]
    assert [m.name for m in hg.members] == ["h1", "w1"]
    assert all(m.address == "127.0.0.1" for m in hg.members)
    assert hg.members[0].ports.to_dict() == {"data": 7001, "session": 7002, "tf": [7003, 7004]}
    assert hg.members[1].ports.to_dict() == {"data": 8001, "session": 8002, "tf": [8003]}
    assert hg.job.epochs == 3 and hg.job.model == "mlp"  # defaults filled in
    assert hg.dataset.to_dict() == {"digest": DIGEST, "size": 1234, "name": "digits"}
    await until(lambda: server.stats()["connections"] == 0)
    assert server.stats()["groups"] == 1


async def test_tokens_and_ids_are_fresh_per_group(server: Matchmaker) -> None:
    groups = []
    for i in range(3):
        w = await queue(server, worker_hello(f"w{i}"))
        await Waiting(server, host_hello(f"h{i}")).group()
        groups.append(await w.group())
    assert len({g.token for g in groups}) == 3
    assert len({g.group_id for g in groups}) == 3


async def test_fifo_oldest_workers_and_position_updates(server: Matchmaker) -> None:
    ws = [await queue(server, worker_hello(f"w{i}")) for i in range(3)]
    assert [w.waits[0].position for w in ws] == [1, 2, 3]
    g = await Waiting(server, host_hello("h", workers=2)).group()
    assert [m.name for m in g.members] == ["h", "w0", "w1"]
    await ws[0].group()
    await ws[1].group()
    # w2 moved from position 3 to 1 and is told so
    await until(lambda: ws[2].waits[-1].position == 1)
    assert not ws[2].task.done()
    await ws[2].leave()


async def test_oldest_host_first(server: Matchmaker) -> None:
    h1 = await queue(server, host_hello("h1"))
    h2 = await queue(server, host_hello("h2"))
    assert h2.waits[0].position == 2
    w1 = Waiting(server, worker_hello("w1"))
    g = await w1.group()
    assert g.members[0].name == "h1"
    await h1.group()
    assert not h2.task.done()
    await until(lambda: bool(h2.waits) and h2.waits[-1].position == 1)
    g2 = await Waiting(server, worker_hello("w2")).group()
    assert g2.members[0].name == "h2"
    await h2.group()


async def test_unsatisfiable_host_does_not_block_younger(server: Matchmaker) -> None:
    big = await queue(server, host_hello("big", workers=5, min_workers=5))
    small = await queue(server, host_hello("small", workers=1))
    g = await Waiting(server, worker_hello("w")).group()
    assert g.members[0].name == "small"
    await small.group()
    assert not big.task.done()
    await big.leave()


async def test_host_with_zero_workers_groups_alone(server: Matchmaker) -> None:
    g = await Waiting(server, host_hello("solo", workers=0, min_workers=0)).group()
    assert len(g.members) == 1 and g.index == 0


# --------------------------------------------------------------------------- host targeting


async def test_worker_targets_tagged_host(server: Matchmaker) -> None:
    untagged = await queue(server, host_hello("plain"))
    lab = await queue(server, host_hello("labhost", tag="lab"))
    g = await Waiting(server, worker_hello("w", want_tag="lab")).group()
    assert g.members[0].name == "labhost"
    await lab.group()
    assert not untagged.task.done()
    await untagged.leave()


async def test_host_targets_tagged_workers(server: Matchmaker) -> None:
    plain = await queue(server, worker_hello("plain"))
    gpu = await queue(server, worker_hello("gpu", tag="gpu"))
    g = await Waiting(server, host_hello("h", want_tag="gpu")).group()
    assert [m.name for m in g.members] == ["h", "gpu"]
    await gpu.group()
    assert not plain.task.done()
    await plain.leave()


async def test_targeting_worker_waits_for_matching_host(server: Matchmaker) -> None:
    w = await queue(server, worker_hello("w", want_tag="nope"))
    h = await queue(server, host_hello("h", tag="other"))
    await asyncio.sleep(0.3)
    assert not w.task.done() and not h.task.done()
    h2 = Waiting(server, host_hello("h2", tag="nope"))
    assert (await w.group()).members[0].name == "h2"
    await h2.group()
    await h.leave()


# --------------------------------------------------------------------------- min workers after wait


async def test_min_workers_accepted_after_wait(server: Matchmaker) -> None:
    loop = asyncio.get_running_loop()
    w = await queue(server, worker_hello("w"))
    start = loop.time()
    h = Waiting(server, host_hello("h", workers=3, min_workers=1, wait=0.6))
    g = await h.group()
    waited = loop.time() - start
    assert waited >= 0.55  # it cannot form before the host's wait runs out
    assert [m.name for m in g.members] == ["h", "w"]
    assert g.job.workers == 3
    await w.group()


async def test_below_min_after_wait_keeps_waiting_until_enough(server: Matchmaker) -> None:
    h = await queue(server, host_hello("h", workers=4, min_workers=2, wait=0.2))
    w1 = await queue(server, worker_hello("w1"))
    await asyncio.sleep(0.4)
    assert not h.task.done()
    w2 = Waiting(server, worker_hello("w2"))
    g = await h.group()
    assert [m.name for m in g.members] == ["h", "w1", "w2"]
    await w1.group()
    await w2.group()


# --------------------------------------------------------------------------- dropped clients


async def test_disconnected_worker_is_never_grouped(server: Matchmaker) -> None:
    gone = await queue(server, worker_hello("gone"))
    gone.task.cancel()  # cancelling register() closes the connection
    with pytest.raises(asyncio.CancelledError):
        await gone.task
    await until(lambda: server.stats()["workers"] == 0)
    h = await queue(server, host_hello("h"))
    await asyncio.sleep(0.1)
    assert not h.task.done()
    w = Waiting(server, worker_hello("fresh"))
    assert [m.name for m in (await h.group()).members] == ["h", "fresh"]
    await w.group()


async def test_raw_disconnect_removed_at_once(server: Matchmaker) -> None:
    reader, writer = await raw(server)
    await wire.write_frame(writer, raw_hello(worker_hello("raw")))
    assert (await wire.read_frame(reader))["type"] == "wait"
    assert server.stats()["workers"] == 1
    writer.close()
    await until(lambda: server.stats()["workers"] == 0 and server.stats()["connections"] == 0)


async def test_silent_client_dropped_after_heartbeat_timeout(make_server: MakeServer) -> None:
    mm = await make_server(heartbeat_timeout=0.4)
    reader, writer = await raw(mm)
    await wire.write_frame(writer, raw_hello(worker_hello("silent")))
    frames = await read_until_closed(reader)  # closed by the server, not by us
    assert [f["type"] for f in frames] == ["wait"]
    assert mm.stats()["workers"] == 0 and mm.stats()["dropped"] == 1
    writer.close()


async def test_heartbeating_client_is_kept(make_server: MakeServer) -> None:
    mm = await make_server(heartbeat_timeout=0.5)
    w = await queue(mm, worker_hello("alive"), heartbeat=0.1)
    await asyncio.sleep(1.2)
    assert not w.task.done()
    assert len(w.waits) > 3  # every heartbeat is answered with a wait frame
    assert mm.stats()["workers"] == 1
    h = Waiting(mm, host_hello("h"))
    await w.group()
    await h.group()


async def test_no_hello_dropped_after_read_timeout(make_server: MakeServer) -> None:
    mm = await make_server(read_timeout=0.3)
    reader, writer = await raw(mm)
    assert await read_until_closed(reader) == []
    assert mm.stats()["connections"] == 0
    writer.close()


async def test_stall_mid_frame_dropped_after_read_timeout(make_server: MakeServer) -> None:
    mm = await make_server(read_timeout=0.4, heartbeat_timeout=30.0)
    reader, writer = await raw(mm)
    await wire.write_frame(writer, raw_hello(worker_hello("slow")))
    assert (await wire.read_frame(reader))["type"] == "wait"
    other = await queue(mm, worker_hello("other"), heartbeat=0.1)
    frame = wire.encode({"type": "heartbeat"})
    writer.write(frame[:6])  # header and two bytes of the body, then nothing
    await writer.drain()
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await read_until_closed(reader) == []
    assert loop.time() - start < 20  # well before the 30 s heartbeat timeout
    assert mm.stats()["workers"] == 1  # the other client is still queued
    g = await Waiting(mm, host_hello("h")).group()
    assert g.members[1].name == "other"
    await other.group()
    writer.close()


async def test_trickling_bytes_do_not_keep_a_frame_alive(make_server: MakeServer) -> None:
    mm = await make_server(read_timeout=0.4)
    reader, writer = await raw(mm)
    frame = wire.encode(raw_hello(worker_hello("drip")))

    async def drip() -> None:
        for b in frame:
            writer.write(bytes([b]))
            await asyncio.sleep(0.1)

    dripper = asyncio.create_task(drip())
    try:
        assert await read_until_closed(reader) == []
    finally:
        dripper.cancel()
        writer.close()


# --------------------------------------------------------------------------- bad frames


async def _error_for(mm: Matchmaker, payload: bytes) -> dict[str, Any]:
    reader, writer = await raw(mm)
    writer.write(payload)
    await writer.drain()
    frames = await read_until_closed(reader)
    writer.close()
    assert len(frames) == 1 and frames[0]["type"] == "error", frames
    assert "Traceback" not in frames[0]["message"]
    return frames[0]


def _framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (_framed(b"\xff\xfe not json"), "bad_frame"),
        (_framed(b"[1, 2]"), "bad_frame"),
        (_framed(b'{"no": "type"}'), "bad_frame"),
        (_framed(b'{"type": "hello", "proto": "crowdd/1", "blob": -1}'), "bad_frame"),
        (struct.pack(">I", 2 << 20), "too_large"),  # size checked before any body is sent
        (wire.encode({"type": "launch_missiles", "proto": "crowdd/1"}), "unknown_type"),
        (wire.encode({"type": "heartbeat", "proto": "crowdd/1"}), "bad_frame"),  # hello first
    ],
    ids=["not-utf8-json", "not-object", "no-type", "bad-blob", "oversized", "unknown-type", "no-hello"],
)
async def test_malformed_frames_get_an_error_and_others_are_served(
    server: Matchmaker, payload: bytes, code: str
) -> None:
    w = await queue(server, worker_hello("bystander"))
    err = await _error_for(server, payload)
    assert err["code"] == code
    g = await Waiting(server, host_hello("h")).group()
    assert g.members[1].name == "bystander"
    await w.group()
    await until(lambda: server.stats()["connections"] == 0)


async def test_blob_refused(server: Matchmaker) -> None:
    err = await _error_for(server, wire.encode({"type": "hello", "proto": wire.PROTO, "blob": 3}) + b"abc")
    assert err["code"] in ("too_large", "bad_frame")


async def test_second_hello_and_unknown_type_while_waiting(server: Matchmaker) -> None:
    for frame, code in (
        (raw_hello(worker_hello("again")), "bad_frame"),
        ({"type": "whatever"}, "unknown_type"),
    ):
        reader, writer = await raw(server)
        await wire.write_frame(writer, raw_hello(worker_hello("w")))
        assert (await wire.read_frame(reader))["type"] == "wait"
        await wire.write_frame(writer, frame)
        frames = await read_until_closed(reader)
        assert frames[-1]["code"] == code
        writer.close()
    await until(lambda: server.stats()["workers"] == 0)


async def test_version_mismatch(server: Matchmaker) -> None:
    err = await _error_for(server, wire.encode({**raw_hello(worker_hello()), "proto": "crowdd/2"}))
    assert err["code"] == "version"
    with_none = {k: v for k, v in raw_hello(worker_hello()).items() if k != "proto"}
    assert (await _error_for(server, wire.encode(with_none)))["code"] == "version"


@pytest.mark.parametrize(
    ("hello", "field"),
    [
        (host_hello(learning_rate=-1), "job.learning_rate"),
        (host_hello(batch_size=0), "job.batch_size"),
        (host_hello(epochs=0), "job.epochs"),
        (host_hello(workers=2000), "job.workers"),
        (host_hello(model="transformer"), "job.model"),
        (host_hello(sharding="random"), "job.sharding"),
        (host_hello(dropout=0.5), "job.dropout"),
        ({**host_hello(), "job": "fast"}, "job"),
        ({k: v for k, v in host_hello().items() if k != "job"}, "job"),
        ({**host_hello(), "dataset": {"digest": "xyz", "size": 1, "name": "d"}}, "dataset.digest"),
        ({**host_hello(), "dataset": {"digest": DIGEST, "size": -1, "name": "d"}}, "dataset.size"),
        ({**host_hello(), "ports": {"data": 1, "session": 2, "tf": [3]}}, "ports.tf"),
        ({**worker_hello(), "ports": {"data": 0, "session": 2, "tf": [3]}}, "ports.data"),
        ({**worker_hello(), "ports": {"data": 1, "session": 2, "tf": [70000]}}, "ports.tf"),
        ({**worker_hello(), "role": "spectator"}, "role"),
        ({**worker_hello(), "name": ""}, "name"),
        ({**worker_hello(), "name": "x" * 65}, "name"),
        ({**worker_hello(), "tag": 5}, "tag"),
        ({**worker_hello(), "job": {}}, "job"),
        (worker_hello(advertise="not a host!"), "advertise"),
    ],
)
async def test_bad_fields_are_named(server: Matchmaker, hello: dict[str, Any], field: str) -> None:
    with pytest.raises(wire.RemoteError) as info:
        await register(server.address, hello, timeout=10)
    assert info.value.code == "bad_field"
    assert info.value.field == field
    assert server.stats()["hosts"] + server.stats()["workers"] == 0


# --------------------------------------------------------------------------- limits


async def test_max_clients_busy(make_server: MakeServer) -> None:
    mm = await make_server(max_clients=2)
    a = await queue(mm, worker_hello("a"))
    b = await queue(mm, worker_hello("b"))
    with pytest.raises(wire.RemoteError) as info:
        await register(mm.address, worker_hello("c"), timeout=10)
    assert info.value.code == "busy"
    await a.leave()
    await until(lambda: mm.stats()["connections"] == 1)
    c = await queue(mm, worker_hello("c"))  # room again
    assert mm.stats()["workers"] == 2
    await b.leave()
    await c.leave()


async def test_max_per_ip_busy(make_server: MakeServer) -> None:
    mm = await make_server(max_per_ip=1)
    a = await queue(mm, worker_hello("a"))
    reader, writer = await raw(mm)
    frames = await read_until_closed(reader)
    writer.close()
    assert [(f["type"], f["code"]) for f in frames] == [("error", "busy")]
    # another address is not affected (the whole of 127/8 is loopback on Linux)
    reader, writer = await raw(mm, local_ip="127.0.0.2")
    await wire.write_frame(writer, raw_hello(worker_hello("b")))
    assert (await wire.read_frame(reader))["type"] == "wait"
    writer.close()
    await a.leave()


# --------------------------------------------------------------------------- addresses


async def test_advertise_ignored_unless_trusted(make_server: MakeServer) -> None:
    for trusted, expect in ((False, "127.0.0.1"), (True, "203.0.113.7")):
        mm = await make_server(trust_advertised=trusted)
        w = await queue(mm, worker_hello("w", advertise="203.0.113.7"))
        g = await Waiting(mm, host_hello("h")).group()
        assert g.members[1].address == expect
        assert g.members[0].address == "127.0.0.1"
        await w.group()


# --------------------------------------------------------------------------- the client


async def test_client_unavailable() -> None:
    sock_server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = sock_server.sockets[0].getsockname()[1]
    sock_server.close()
    await sock_server.wait_closed()
    with pytest.raises(MatchmakerUnavailable, match="cannot reach"):
        await register(("127.0.0.1", port), worker_hello())


async def test_client_total_timeout(server: Matchmaker) -> None:
    with pytest.raises(wire.FrameTimeout, match="no group"):
        await register(server.address, worker_hello(), timeout=0.3)
    await until(lambda: server.stats()["workers"] == 0)


async def test_client_sees_server_close(make_server: MakeServer) -> None:
    mm = await make_server()
    w = await queue(mm, worker_hello())
    await mm.close()
    with pytest.raises(wire.ConnectionClosed):
        await w.group()


async def test_client_detects_silent_server() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    srv = await asyncio.start_server(mute, "127.0.0.1", 0, ssl=MM_TLS)
    try:
        with pytest.raises(wire.FrameTimeout):
            await asyncio.wait_for(register(srv.sockets[0].getsockname()[:2], worker_hello(), silence=0.3), 20)
    finally:
        srv.close()


async def test_client_rejects_unknown_server_frame() -> None:
    async def odd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await wire.read_frame(reader)
        await wire.write_frame(writer, {"type": "surprise"})
        await asyncio.sleep(5)

    srv = await asyncio.start_server(odd, "127.0.0.1", 0, ssl=MM_TLS)
    try:
        with pytest.raises(wire.WireError, match="surprise"):
            await register(srv.sockets[0].getsockname()[:2], worker_hello(), timeout=10)
    finally:
        srv.close()


# --------------------------------------------------------------------------- logging


async def test_groups_and_queue_sizes_are_logged(server: Matchmaker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="crowdd.matchmaker")
    w = await queue(server, worker_hello("w1"))
    await Waiting(server, host_hello("h1")).group()
    await w.group()
    parked = await queue(server, worker_hello("parked"))
    await until(lambda: any("1 worker(s) waiting" in r.getMessage() for r in caplog.records))  # status_interval 0.2 s
    formed = [r.getMessage() for r in caplog.records if " formed: " in r.getMessage()]
    assert len(formed) == 1 and "'h1'" in formed[0] and "w1@127.0.0.1" in formed[0]
    await parked.leave()


# --------------------------------------------------------------------------- graceful close


async def test_group_frame_survives_a_heartbeat_storm(server: Matchmaker) -> None:
    """Closing with unread input would reset the connection and could destroy the group frame."""
    reader, writer = await raw(server)
    await wire.write_frame(writer, raw_hello(worker_hello("stormy")))
    beat = wire.encode({"type": "heartbeat"})

    async def storm() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(beat * 20)
                await writer.drain()
                await asyncio.sleep(0.001)

    storming = asyncio.create_task(storm())
    try:
        await asyncio.sleep(0.1)
        await Waiting(server, host_hello("h")).group()
        frames = await read_until_closed(reader)
        assert frames[-1]["type"] == "group" and frames[-1]["index"] == 1
        assert {f["type"] for f in frames[:-1]} == {"wait"}
    finally:
        storming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await storming
        writer.close()


async def test_lingering_peer_is_aborted_after_read_timeout(make_server: MakeServer) -> None:
    mm = await make_server(read_timeout=0.3)
    reader, writer = await raw(mm)
    await wire.write_frame(writer, raw_hello(worker_hello("lingers")))
    await Waiting(mm, host_hello("h")).group()
    frames = await read_until_closed(reader)  # the server half-closed after the group frame
    assert frames[-1]["type"] == "group"
    # we never close our side: the server gives up on us after read_timeout
    await until(lambda: mm.stats()["connections"] == 0)
    writer.close()


# --------------------------------------------------------------------------- TLS


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    out = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            out += chunk
    return out


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refusing a connection from 127.0.0.1" in r.getMessage()]


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (wire.encode(raw_hello(worker_hello("plain"))), "does not speak TLS"),  # an older crowdd
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "does not speak TLS"),
        (b"\x16\x03\x01\x00\x05" + b"\xff" * 5, "TLS handshake failed"),  # a record of garbage
        (bytes(range(256)) * 4, "does not speak TLS"),  # not even a TLS record
    ],
    ids=["plaintext-hello", "http", "garbage-record", "garbage"],
)
async def test_a_client_without_tls_is_refused_and_others_are_served(
    server: Matchmaker, caplog: pytest.LogCaptureFixture, payload: bytes, why: str
) -> None:
    caplog.set_level(logging.INFO, logger="crowdd.matchmaker")
    w = await queue(server, worker_hello("bystander"))
    reader, writer = await raw(server, tls=False)
    writer.write(payload)
    await writer.drain()
    got = await _read_all(reader)  # the server closes; nothing it sent is a crowdd frame
    writer.close()
    assert b'"type"' not in got and b"wait" not in got
    await until(lambda: bool(_refusals(caplog)))
    assert why in _refusals(caplog)[0]
    assert server.stats()["tls_refused"] == 1 and server.stats()["workers"] == 1
    g = await Waiting(server, host_hello("h")).group()
    assert g.members[1].name == "bystander"
    await w.group()


async def test_a_client_offering_only_tls_1_2_is_refused(server: Matchmaker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="crowdd.matchmaker")
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection(*server.address, ssl=old)
    await until(lambda: bool(_refusals(caplog)))
    assert "TLS" in _refusals(caplog)[0]


async def test_a_stalled_handshake_is_cut_off(make_server: MakeServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="crowdd.matchmaker")
    mm = await make_server(read_timeout=0.3)
    reader, writer = await raw(mm, tls=False)  # connects, never starts the handshake
    assert await _read_all(reader) == b""
    writer.close()
    await until(lambda: bool(_refusals(caplog)))
    assert "no TLS handshake within 0.3 s" in _refusals(caplog)[0]
    w = await queue(mm, worker_hello("after"))  # still serving
    await w.leave()


async def test_a_wrong_fingerprint_is_not_the_matchmaker(server: Matchmaker) -> None:
    with pytest.raises(MatchmakerUntrusted, match="is not the matchmaker.*matchmaker_fingerprint"):
        await register(server.address, worker_hello("w"), timeout=10, fingerprint=identity("impostor").fingerprint)
    assert server.stats()["workers"] == 0


async def test_without_a_pin_the_system_trust_store_decides(server: Matchmaker) -> None:
    """A self-signed matchmaker is not trusted by the system: the error says to pin it."""
    with pytest.raises(MatchmakerUntrusted, match="does not trust.*matchmaker_fingerprint"):
        await register(server.address, worker_hello("w"), timeout=10, fingerprint="")
    assert server.stats()["workers"] == 0


async def test_the_client_speaks_tls_to_a_plaintext_server() -> None:
    """A plaintext server (not the matchmaker, or an old one) never gets the hello."""
    got: list[bytes] = []

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.read(65536))
        writer.close()

    srv = await asyncio.start_server(plain, "127.0.0.1", 0)
    try:
        with pytest.raises((MatchmakerUnavailable, MatchmakerUntrusted, wire.ConnectionClosed)):
            await register(srv.sockets[0].getsockname()[:2], worker_hello("w"), timeout=10)
        assert got and got[0][:1] == b"\x16" and b"hello" not in got[0]  # a TLS ClientHello, no crowdd frame
    finally:
        srv.close()


# --------------------------------------------------------------------------- reachability (connect-back)


@pytest.fixture
def listener() -> Callable[[], socket.socket]:
    socks: list[socket.socket] = []

    def make() -> socket.socket:
        s = socket.create_server(("127.0.0.1", 0))
        socks.append(s)
        return s

    yield make  # type: ignore[misc]
    for s in socks:
        s.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _at(hello: dict[str, Any], data_port: int) -> dict[str, Any]:
    return {**hello, "ports": {**hello["ports"], "data": data_port}}


async def test_reachability_is_checked_and_said_per_member(
    make_server: MakeServer, listener: Callable[[], socket.socket]
) -> None:
    mm = await make_server(check_reachable=True, reach_timeout=1.0)
    open_w = await queue(mm, _at(worker_hello("open"), listener().getsockname()[1]))
    natd = await queue(mm, _at(worker_hello("natd"), _closed_port()))
    reader, writer = await raw(mm)  # the host, raw, to see the group frame itself
    await wire.write_frame(writer, raw_hello(_at(host_hello("h", workers=2), listener().getsockname()[1])))
    frames = await read_until_closed(reader)
    writer.close()
    group = frames[-1]
    assert group["type"] == "group"
    assert [(m["name"], m["reachable"]) for m in group["members"]] == [("h", True), ("open", True), ("natd", False)]
    plan = await natd.group()
    assert plan.reachable == (True, True, False)
    assert plan.route().source in (0, 1) and plan.route().targets == ()  # a leaf, fed by a reachable member
    await open_w.group()


async def test_an_unreachable_host_is_refused_at_once_with_the_fix(make_server: MakeServer) -> None:
    mm = await make_server(check_reachable=True, reach_timeout=1.0)
    hello = _at(host_hello("h"), _closed_port())
    with pytest.raises(wire.RemoteError) as info:
        await register(mm.address, hello, timeout=10)
    assert info.value.code == "unreachable"
    msg = info.value.message
    assert f"Forward TCP ports {hello['ports']['data']} and {hello['ports']['session']}" in msg
    assert "advertise_host" in msg and "trust_advertised" in msg
    assert mm.stats()["hosts"] == 0


async def test_a_slow_connect_back_blocks_nobody_and_groups_nobody_early(
    make_server: MakeServer, listener: Callable[[], socket.socket]
) -> None:
    """A member is queued only once its check has answered; meanwhile everyone else is served.
    Its data port is a real listener that answers only once released (its accept queue full)."""
    mm = await make_server(check_reachable=True, reach_timeout=10.0)
    with SlowListener() as held:
        slow = Waiting(mm, _at(worker_hello("slow"), held.port))
        await until(lambda: any(c.state == "checking" for c in mm.conns.values()))
        fast = await queue(mm, _at(worker_hello("fast"), listener().getsockname()[1]))
        g = await Waiting(mm, _at(host_hello("h"), listener().getsockname()[1])).group()
        assert [m.name for m in g.members] == ["h", "fast"]  # the one still being checked is not taken
        await fast.group()
        assert not slow.waits and not slow.task.done()
        held.release()
        await slow.queued()
    assert slow.waits[0].position == 1
    await slow.leave()


async def test_the_check_can_be_switched_off(make_server: MakeServer) -> None:
    mm = await make_server(check_reachable=False)
    w = await queue(mm, _at(worker_hello("w"), _closed_port()))
    g = await Waiting(mm, _at(host_hello("h"), _closed_port())).group()
    assert g.reachable == (True, True)  # not checked: taken as reachable
    await w.group()


# --------------------------------------------------------------------------- the collector


@pytest.mark.parametrize("reclaim", [True, False])
async def test_settling_freezes_arrivals_and_reclaims_closed_connections(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch, reclaim: bool
) -> None:
    """Arrivals are frozen (full passes stay short), and the cycles that closed connections
    leave among frozen objects (asyncio's socket transports) are reclaimed once enough have
    closed; without the reclaim they would stay (the control case)."""
    import gc

    monkeypatch.setattr(mm_module, "SETTLE_EVERY", 8)
    monkeypatch.setattr(mm_module, "RECLAIM_MIN", 16 if reclaim else 10**9)
    mm = await make_server()
    try:
        gc.collect()
        gc.freeze()
        before = gc.get_freeze_count()
        ws = [await queue(mm, worker_hello(f"w{i}")) for i in range(20)]
        mm._settle()
        assert gc.get_freeze_count() > before  # the waiting clients' objects are frozen
        for w in ws:
            await w.leave()
        await until(lambda: mm.stats()["connections"] == 0)
        mm._settle()  # reclaim: 20 closed >= RECLAIM_MIN
        gc.unfreeze()
        left = gc.collect()  # what frozen garbage was left behind
        assert (left < 40) if reclaim else (left >= 20 * 4)  # a closed transport is a cycle of ~5
    finally:
        gc.unfreeze()


# --------------------------------------------------------------------------- handshake slots


async def test_handshakes_take_turns(make_server: MakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every handshake slot taken, a newcomer waits (no TLS state yet) and goes on as
    soon as a slot frees."""
    monkeypatch.setattr(handshakes, "MAX_HANDSHAKES", 1)
    mm = await make_server(read_timeout=5.0)
    _, staller = await raw(mm, tls=False)  # takes the only slot and never says ClientHello
    await until(lambda: mm.stats()["handshaking"] == 1)
    w = Waiting(mm, worker_hello("w"))
    await until(lambda: mm.stats()["arrivals"] == 1)
    await asyncio.sleep(0.3)
    assert not w.waits and mm.stats()["workers"] == 0  # still waiting for its turn
    staller.close()  # the slot frees: the newcomer's handshake runs
    await w.queued()
    assert mm.stats()["handshaking"] == 0 and mm.stats()["arrivals"] == 0
    await w.leave()


async def test_stalled_handshakes_from_one_source_cannot_hold_the_matchmaker(
    make_server: MakeServer
) -> None:
    """Connections that never finish their TLS handshake count against their source (issue 29):
    past ``max_handshaking_per_ip`` of them, a new one from the same address is closed at once.
    The controls: one from another address (127.0.0.2) is kept, and once the stalled ones are
    gone the same address registers again."""
    mm = await make_server(read_timeout=30.0, max_handshaking_per_ip=3)
    stalled = [await raw(mm, tls=False) for _ in range(3)]  # each says nothing: its handshake waits
    await until(lambda: mm.stats()["handshaking"] == 3)
    reader, extra = await raw(mm, tls=False)  # one too many from 127.0.0.1
    assert await asyncio.wait_for(reader.read(), 5.0) == b""  # closed at once, not after 30 s
    other_r, other = await raw(mm, "127.0.0.2", tls=False)  # another source: its turn comes
    await until(lambda: mm.stats()["handshaking"] == 4)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(other_r.read(), 0.5)
    assert mm.stats()["dropped"] >= 1
    for _, w in [*stalled, (other_r, other), (reader, extra)]:
        w.close()
    await until(lambda: mm.stats()["handshaking"] == 0)
    w = Waiting(mm, worker_hello("w"))  # 127.0.0.1 is welcome again
    await w.queued()
    await w.leave()


async def test_a_connection_waiting_too_long_for_a_slot_is_closed(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handshakes, "MAX_HANDSHAKES", 1)
    mm = await make_server(read_timeout=0.6)
    _, staller = await raw(mm, tls=False)
    await until(lambda: mm.stats()["handshaking"] == 1)
    _, second = await raw(mm, tls=False)
    reader3, third = await raw(mm, tls=False)
    await until(lambda: mm.stats()["arrivals"] == 2)
    assert await _read_all(reader3) == b""  # closed after waiting read_timeout for a slot
    assert mm.stats()["dropped"] == 1  # (the other two: their handshakes timed out)
    await until(lambda: mm.stats()["arrivals"] == 0 and mm.stats()["handshaking"] == 0)
    for w in (staller, second, third):
        w.close()
    ok = await queue(mm, worker_hello("later"))  # serving as before
    await ok.leave()

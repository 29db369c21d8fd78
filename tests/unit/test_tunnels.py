"""The daemon's tunnel ends: TF connections one way (host to worker) over pinned TLS, and what they refuse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path

import pytest

from crowdd.node.tunnels import HostTunnels, WorkerTunnels
from crowdd.testing.tunnel_bridge import TunnelBridge

pytestmark = pytest.mark.timeout(60)


async def _echo_at(path: Path) -> asyncio.base_events.Server:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(1 << 16):
            w.write(data)
            await w.drain()
        w.close()

    return await asyncio.start_unix_server(echo, path=str(path))


async def _round_trip(path: Path, payload: bytes) -> bytes:
    r, w = await asyncio.open_unix_connection(str(path))
    w.write(payload)
    await w.drain()
    got = await asyncio.wait_for(r.readexactly(len(payload)), 10)
    w.close()
    return got


async def _recording_echo_at(path: Path, seen: list[bytes]) -> asyncio.base_events.Server:
    """An echo server that also records every connection it gets (what reached that task)."""

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got = b""
        while data := await r.read(1 << 16):
            got += data
            w.write(data)
            await w.drain()
        seen.append(got)
        w.close()

    return await asyncio.start_unix_server(echo, path=str(path))


def test_the_host_reaches_each_workers_task_and_no_worker_reaches_anything() -> None:
    """TF traffic flows one way: the host's job reaches each worker's task (the worker dials
    back), 4 MiB each way intact; a worker's job has no socket to reach anything through."""
    bridge = TunnelBridge(2, isolated=False)
    try:
        relays = bridge.relays(21000)
        assert relays[0].serve == (("w0", 21000),) and relays[0].reach == (("w1", 21001), ("w2", 21002))
        assert [(r.serve, r.reach) for r in relays[1:]] == [((("w1", 21001),), ()), ((("w2", 21002),), ())]
        host_dir, w1_dir, w2_dir = bridge.host.directory, bridge.worker_ends[0].directory, bridge.worker_ends[1].directory
        payload = bytes(range(256)) * (1 << 14)
        at_w1: list[bytes] = []

        async def scenario() -> None:
            servers = [await _echo_at(host_dir / "w0.in"), await _recording_echo_at(w1_dir / "w1.in", at_w1),
                       await _echo_at(w2_dir / "w2.in")]
            try:
                assert await _round_trip(host_dir / "w1.out", payload) == payload
                assert await _round_trip(host_dir / "w2.out", b"to w2") == b"to w2"
                for d in (w1_dir, w2_dir):  # a worker's job has nowhere to connect to
                    assert sorted(p.name for p in d.glob("*.out")) == []
                assert sorted(p.name for p in host_dir.glob("*.out")) == ["w1.out", "w2.out"]
                assert not (w1_dir / "ps.out").exists() and not (host_dir / "ps.in").exists()
                for _ in range(100):
                    if at_w1:
                        break
                    await asyncio.sleep(0.05)
                assert at_w1 == [payload]  # the host's connection reached worker 1's task
            finally:
                for s in servers:
                    s.close()

        asyncio.run(scenario())
    finally:
        bridge.close()
    assert not host_dir.exists() and not w1_dir.exists()  # nothing left behind


def test_a_stream_a_worker_opens_on_its_own_carries_nothing_to_the_host() -> None:
    """Over the real pinned-TLS path, a worker (a modified client) opens tunnel streams the
    host never asked for: the old parameter server's ``{"tunnel": "ps"}``, a stream id nobody
    requested, an id of the wrong type. Each is closed at once and nothing reaches the host's
    job. Control: a stream the host requested (a dial-back) still carries the host's
    connection to the worker's task."""
    bridge = TunnelBridge(1, isolated=False)
    try:
        bridge.relays(21200)
        host_dir, w1_dir = bridge.host.directory, bridge.worker_ends[0].directory
        at_host: list[bytes] = []
        at_w1: list[bytes] = []
        connect = bridge.worker_ends[0].connect
        assert connect is not None

        async def scenario() -> None:
            servers = [await _recording_echo_at(host_dir / "w0.in", at_host),
                       await _recording_echo_at(host_dir / "ps.in", at_host),
                       await _recording_echo_at(w1_dir / "w1.in", at_w1)]
            try:
                for hello in ({"tunnel": "ps"}, {"tunnel": "stream", "stream": 1}, {"tunnel": "stream", "stream": 99},
                              {"tunnel": "stream", "stream": "1"}, {"tunnel": "stream", "stream": True},
                              {"tunnel": "worker", "task": 0}, {}):
                    r, w = await connect(hello)
                    w.write(b"GET /model HTTP/2")
                    with contextlib.suppress(ConnectionError):  # the host may have closed it already
                        await w.drain()
                    assert await _ended(r), hello
                    w.close()
                # the control: the host's job asks for worker 1's task; the dial-back carries it
                assert await _round_trip(host_dir / "w1.out", b"requested") == b"requested"
                for _ in range(100):
                    if at_w1:
                        break
                    await asyncio.sleep(0.05)
                assert at_w1 == [b"requested"]
                assert at_host == []  # nothing a worker opened reached the host's job
            finally:
                for s in servers:
                    s.close()

        asyncio.run(scenario())
    finally:
        bridge.close()


class _Writer:
    """Records whether the tunnel end closed the connection it was handed."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


async def test_host_refuses_streams_it_did_not_ask_for(caplog: pytest.LogCaptureFixture) -> None:
    asked: list[tuple[int, int, int]] = []
    host = HostTunnels(dial=lambda m, s, t: asked.append((m, s, t)) is None, timeout=0.5)
    try:
        await host.reach_workers({1: 1})
        reader = asyncio.StreamReader()
        with caplog.at_level(logging.WARNING, logger="crowdd.node.tunnels"):
            # a parameter server stream (there is none to reach), from a member of the cluster
            # and from one that is not
            for member in (1, 2):
                w = _Writer()
                await host.accept(member, {"tunnel": "ps"}, (reader, w))  # type: ignore[arg-type]
                assert w.closed and "unrequested" in caplog.text
            # a reverse stream nobody asked for
            w = _Writer()
            await host.accept(1, {"tunnel": "stream", "stream": 99}, (reader, w))  # type: ignore[arg-type]
            assert w.closed and "unrequested" in caplog.text
            # a stream asked of worker 1, answered by worker 2
            opening = asyncio.create_task(host.open_stream(1, 1))
            await asyncio.sleep(0.05)
            stream = asked[-1][1]
            w = _Writer()
            await host.accept(2, {"tunnel": "stream", "stream": stream}, (reader, w))  # type: ignore[arg-type]
            assert w.closed
            assert await opening is None  # and worker 1 never answered: timed out
            # once timed out, the id is no longer pending: its late answer is refused too
            w = _Writer()
            await host.accept(1, {"tunnel": "stream", "stream": stream}, (reader, w))  # type: ignore[arg-type]
            assert w.closed
            # the control: the stream asked of worker 1, answered by worker 1, is taken
            opening = asyncio.create_task(host.open_stream(1, 1))
            await asyncio.sleep(0.05)
            stream = asked[-1][1]
            w = _Writer()
            await host.accept(1, {"tunnel": "stream", "stream": stream}, (reader, w))  # type: ignore[arg-type]
            assert not w.closed
            assert await opening == (reader, w)
            # and answered twice: the second one is refused
            w2 = _Writer()
            await host.accept(1, {"tunnel": "stream", "stream": stream}, (reader, w2))  # type: ignore[arg-type]
            assert w2.closed
    finally:
        await host.close()


async def test_probe_says_whether_the_worker_dialled_back() -> None:
    ends: dict[str, WorkerTunnels] = {}

    async def connect(hello: dict) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        r, w = await asyncio.open_unix_connection(str(sink))
        await host.accept(1, hello, (asyncio.StreamReader(), w))
        return r, w

    host = HostTunnels(dial=lambda m, s, t: ends["w"].on_dial(s, t) is None, timeout=1.0)
    ends["w"] = WorkerTunnels(connect=connect)
    sink = host.directory / "sink"
    server = await asyncio.start_unix_server(lambda r, w: None, path=str(sink))
    try:
        assert await host.probe(1, 1) is True
        mute = HostTunnels(dial=lambda m, s, t: True, timeout=0.3)  # asked, never dials
        assert await mute.probe(1, 1) is False
        await mute.close()
        gone = HostTunnels(dial=lambda m, s, t: False)  # cannot even be asked
        assert await gone.probe(1, 1) is False
        await gone.close()
    finally:
        server.close()
        await ends["w"].close()
        await host.close()


def test_relay_sockets_live_in_the_runtime_dir_when_its_path_is_short_enough(tmp_path: Path) -> None:
    """Below the daemon's runtime directory they go with it, even after a SIGKILL (the next
    start removes what is left); a runtime directory too long for a socket path falls back to
    the temporary directory."""
    import socket as _socket

    from crowdd.node.tunnels import SOCKET_BASE_MAX, remove_stale_socket_dirs, socket_dir

    base = tmp_path / "run"
    assert len(str(base)) <= SOCKET_BASE_MAX
    d = socket_dir(base)
    assert d.parent == base and oct(d.stat().st_mode & 0o777) == "0o700"
    longest = d / "w999.out"
    s = _socket.socket(_socket.AF_UNIX)
    s.bind(str(longest))  # the longest name a relay uses still fits
    s.close()
    long_base = tmp_path / ("x" * (SOCKET_BASE_MAX + 1 - len(str(tmp_path)) - 1))
    assert len(str(long_base)) == SOCKET_BASE_MAX + 1
    fallback = socket_dir(long_base)
    try:
        assert not fallback.is_relative_to(long_base)
    finally:
        fallback.rmdir()
    keep = base / "control.sock"
    keep.write_text("")
    remove_stale_socket_dirs(base)
    assert not d.exists() and keep.exists()


def test_a_cut_worker_loses_its_connections_both_ways_until_restored() -> None:
    """The host daemon cuts a worker that froze or went away: the TF connections carried to it
    end at once (a call to a frozen machine fails instead of hanging), new ones are refused,
    the other worker's connections live on, and after a restore it is reached again."""
    bridge = TunnelBridge(2, isolated=False)
    try:
        bridge.relays(21100)
        host_dir, w1_dir, w2_dir = bridge.host.directory, bridge.worker_ends[0].directory, bridge.worker_ends[1].directory

        async def open_(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            r, w = await asyncio.open_unix_connection(str(path))
            w.write(b"ping")
            await w.drain()
            assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
            return r, w

        async def scenario() -> None:
            servers = [await _echo_at(host_dir / "w0.in"), await _echo_at(w1_dir / "w1.in"),
                       await _echo_at(w2_dir / "w2.in")]
            try:
                to_w1 = await open_(host_dir / "w1.out")
                again_w1 = await open_(host_dir / "w1.out")
                to_w2 = await open_(host_dir / "w2.out")
                await asyncio.to_thread(bridge.cut, 1)
                for r, _ in (to_w1, again_w1):  # every connection to worker 1 ends
                    assert await _ended(r)
                for _ in range(2):  # and new ones are closed
                    r, w = await asyncio.open_unix_connection(str(host_dir / "w1.out"))
                    w.write(b"x")
                    assert await _ended(r)
                    w.close()
                to_w2[1].write(b"more")  # worker 2 is untouched
                assert await asyncio.wait_for(to_w2[0].readexactly(4), 5) == b"more"
                await asyncio.to_thread(bridge.restore, 1)
                assert await _round_trip(host_dir / "w1.out", b"again") == b"again"
                for _, w in (to_w1, again_w1, to_w2):
                    w.close()
            finally:
                for s in servers:
                    s.close()

        asyncio.run(scenario())
    finally:
        bridge.close()


async def _ended(r: asyncio.StreamReader) -> bool:
    """The connection was closed (EOF or reset) without carrying anything back."""
    try:
        return await asyncio.wait_for(r.read(), 5) == b""
    except (ConnectionError, ssl.SSLError):  # reset, or a broken pipe where our write met the close
        return True

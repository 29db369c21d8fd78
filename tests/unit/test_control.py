"""The control socket: requests, bad frames, subscribers (several, vanishing, slow), TCP+token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import sys
import struct
import time
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from crowdd import wire
from crowdd.node import control
from crowdd.trust.identity import Identity
from crowdd.trust.tls import client_context, open_tls
from crowdd.hyperparams import Job
from crowdd.protocol.control import HostRequest
from crowdd.errors import Unavailable
from crowdd.platform.userns import probe as userns_probe
from crowdd.node.daemon import Daemon
from crowdd.client.control import ControlClient
from crowdd.node.control import ControlServer
from crowdd.protocol.endpoint import Endpoint, TokenFile, read_token_file, write_token_file

pytestmark = pytest.mark.timeout(60)


DATASET = __file__  # any absolute path that exists


class FakeDaemon:
    """A ControlHandler that records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.donating = False

    def status(self) -> dict[str, Any]:
        return {"version": "test", "state": "off", "donating": self.donating, "role": None,
                "idle": {"allowed": True, "rule": None, "reason": "test"}, "queue": None, "group": None,
                "job": None, "dataset": None, "training": None, "result": None, "error": None}

    async def donate(self, on: bool) -> dict[str, Any]:
        self.calls.append(("donate", on))
        self.donating = on
        return {"type": "ok", "donating": on}

    async def host(self, request: HostRequest) -> dict[str, Any]:
        self.calls.append(("host", str(request.dataset), request.job, request.test_fraction))
        return {"type": "ok"}

    async def stop(self) -> dict[str, Any]:
        self.calls.append(("stop",))
        return {"type": "ok"}

    async def reload(self) -> dict[str, Any]:
        self.calls.append(("reload",))
        return {"type": "ok"}

    async def pause(self, hours: float) -> dict[str, Any]:
        self.calls.append(("pause", hours))
        return {"type": "ok", "paused_until": 1.0e9 + hours * 3600}

    async def resume(self) -> dict[str, Any]:
        self.calls.append(("resume",))
        return {"type": "ok", "paused_until": None, "was_paused": True}


@contextlib.asynccontextmanager
async def fake_served(ep: Endpoint) -> AsyncIterator[tuple[FakeDaemon, ControlServer, Endpoint]]:
    """The control server in front of a handler that records what it was asked."""
    handler = FakeDaemon()
    server = ControlServer(handler, ep, write_timeout=1.0, body_timeout=1.0)
    await server.start()
    try:
        yield handler, server, ep
    finally:
        await server.close()


@pytest.fixture
async def served_fake(tmp_path: Path):
    async with fake_served(Endpoint(path=tmp_path / "run" / "control.sock")) as got:
        yield got


def real_daemon(tmp_path: Path, ep: Endpoint) -> Daemon:
    """A real daemon (not donating: it never dials the matchmaker) serving ``ep``."""
    from crowdd.config import Config, Paths
    from crowdd.idle.policy import AlwaysIdle

    cfg = Config()
    cfg.daemon.listen_host = "127.0.0.1"
    return Daemon(cfg, Paths.under(tmp_path / "node"), endpoint=ep, matchmaker=("127.0.0.1", 9), policy=AlwaysIdle(),
                  name="control-test")


@pytest.fixture(params=["fake", "real"])
async def served(request: pytest.FixtureRequest, tmp_path: Path):
    """The control server in front of the recording handler, and in front of a real daemon:
    what the protocol promises holds for both."""
    ep = Endpoint(path=tmp_path / "run" / "control.sock")
    if request.param == "fake":
        async with fake_served(ep) as got:
            yield got
        return
    daemon = real_daemon(tmp_path, ep)
    await daemon.start()
    try:
        yield daemon, daemon._control, ep
    finally:
        await daemon.close()


async def raw(ep: Endpoint) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert ep.path is not None
    return await asyncio.open_unix_connection(str(ep.path))


async def test_requests_round_trip(served_fake: Any) -> None:
    handler, _, ep = served_fake
    async with ControlClient(ep.path) as c:
        st = await c.status()
        assert st["type"] == "status" and st["state"] == "off"
        assert (await c.donate(True)) == {"type": "ok", "donating": True}
        assert (await c.host(DATASET, {"epochs": 2}, 0.25))["type"] == "ok"
        assert (await c.stop())["type"] == "ok"
        assert (await c.reload())["type"] == "ok"
    # the handler gets typed values, checked once at the socket (defaults filled in)
    assert handler.calls == [("donate", True), ("host", DATASET, Job(epochs=2), 0.25), ("stop",), ("reload",)]


async def test_pause_and_resume_reach_the_daemon_checked(served_fake: Any) -> None:
    handler, _, ep = served_fake
    async with ControlClient(ep.path) as c:
        assert (await c.pause(2))["paused_until"] == 1.0e9 + 7200
        assert (await c.resume())["was_paused"] is True
        for bad in (0, -1, "2h", None, True, 24 * 365 + 1):
            with pytest.raises(wire.RemoteError) as err:
                await c.request({"type": "pause", "hours": bad})
            assert err.value.code == "bad_field" and err.value.field == "hours"
        assert (await c.status())["type"] == "status"  # refusals keep the connection
    assert handler.calls == [("pause", 2.0), ("resume",)]  # the daemon only ever sees good hours


async def test_a_real_daemon_answers_each_request_checked(tmp_path: Path) -> None:
    """The client's requests against the real daemon: its state, donation, pause and resume,
    and a host request it refuses with the field at fault."""
    ep = Endpoint(path=tmp_path / "run" / "control.sock")
    daemon = real_daemon(tmp_path, ep)
    await daemon.start()
    try:
        async with ControlClient(ep.path) as c:
            st = await c.status()
            assert st["type"] == "status" and st["state"] == "off" and st["donating"] is False
            paused = await c.pause(2)
            assert paused["type"] == "ok" and paused["paused_until"] > time.time() + 7100
            assert (await c.resume())["was_paused"] is True
            with pytest.raises(wire.RemoteError) as err:
                await c.host("/no/such/file.npz", {})
            assert err.value.field == "dataset"
            with pytest.raises(wire.RemoteError) as err:
                await c.request({"type": "pause", "hours": -1})
            assert err.value.field == "hours"
            assert (await c.status())["state"] == "off"  # nothing it refused changed it
    finally:
        await daemon.close()


async def test_socket_mode_is_user_only(served: Any) -> None:
    _, _, ep = served
    mode = stat.S_IMODE(os.stat(ep.path).st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(ep.path.parent).st_mode) == 0o700


@pytest.mark.skipif(not userns_probe().available, reason="no unprivileged user namespaces here")
async def test_a_job_in_its_user_namespace_is_refused(served: Any) -> None:
    """A confined job runs as this user, so the socket's mode lets it connect: as a job would
    (``unshare --user --map-root-user``), a client switching donation on is refused; the
    same client outside is served (the control)."""
    handler, _, ep = served
    client = ("import asyncio, sys; from crowdd.client.control import ControlClient\n"
              "async def main():\n"
              "    async with ControlClient(sys.argv[1]) as c:\n"
              "        print((await c.donate(True))['type'])\n"
              "try:\n    asyncio.run(main())\nexcept Exception as exc:\n    print('refused:', exc)\n")

    async def run(prefix: list[str]) -> str:
        proc = await asyncio.create_subprocess_exec(*prefix, sys.executable, "-c", client, str(ep.path),
                                                    stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        return out.decode().strip()

    got = await run(["unshare", "--user", "--map-root-user", "--"])
    # the refusal's frame, or (when the daemon closed before the client finished writing) a
    # closed socket: either way nothing was served
    assert got.startswith("refused:") and ("another user namespace" in got or "went away" in got), got
    assert handler.status()["donating"] is False
    assert await run([]) == "ok" and handler.status()["donating"] is True


def test_a_peer_that_cannot_be_placed_is_refused_not_served(tmp_path: Path) -> None:
    """The "not a job" check fails closed: a peer that connected and then went (its pid no
    longer names it, so its namespace cannot be read) is refused; the control, a live peer in
    this user namespace, is served. (A job would exit right after connecting to slip past.)"""
    from crowdd.platform.userns import why_not_served

    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen()
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        live.connect(path)
        conn, _ = srv.accept()
        with live, conn:
            assert why_not_served(conn) is None
        child = subprocess.run([sys.executable, "-c", f"import socket; socket.socket(socket.AF_UNIX).connect({path!r})"],
                               timeout=30)
        assert child.returncode == 0
        conn, _ = srv.accept()  # queued by the child, which is gone now
        with conn:
            why = why_not_served(conn)
            assert why is not None and "gone" in why, why


async def test_bad_field_keeps_the_connection(served_fake: Any) -> None:
    handler, _, ep = served_fake
    async with ControlClient(ep.path) as c:
        with pytest.raises(wire.RemoteError) as err:
            await c.host(DATASET, {"learning_rate": -1})
        assert err.value.code == "bad_field" and err.value.field == "learning_rate"
        for dataset, tf, field in (("relative.npz", None, "dataset"), ("/no/such/file", None, "dataset"),
                                   (DATASET, 1.5, "test_fraction")):
            with pytest.raises(wire.RemoteError) as err:
                await c.host(dataset, {}, tf)
            assert err.value.field == field
        with pytest.raises(wire.RemoteError) as err:
            await c.request({"type": "donate", "on": "yes"})
        assert err.value.field == "on"
        assert (await c.status())["type"] == "status"  # same connection still serves
    assert not [call for call in handler.calls if call[0] == "host"]  # bad input never reached the daemon


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (struct.pack(">I", 5) + b"nope!", "bad_frame"),
        (struct.pack(">I", 2) + b"[]", "bad_frame"),
        (struct.pack(">I", 1 << 30), "too_large"),
        (wire.encode({"type": "status"}), "version"),
        (wire.encode({"type": "status", "proto": "crowdd/0"}), "version"),
        (wire.encode({"type": "launch", "proto": wire.PROTO}), "unknown_type"),
        (wire.encode({"type": "status", "proto": wire.PROTO, "blob": 3}) + b"abc", "bad_frame"),
    ],
)
async def test_bad_frames_get_an_error_and_close(served: Any, payload: bytes, code: str) -> None:
    _, _, ep = served
    r, w = await raw(ep)
    w.write(payload)
    await w.drain()
    reply = await wire.read_frame(r, timeout=5)
    assert reply["type"] == "error" and reply["code"] == code
    assert "Traceback" not in reply["message"]
    assert await asyncio.wait_for(r.read(), 5) == b""  # closed by the server
    w.close()
    # ... and the daemon keeps serving everyone else
    async with ControlClient(ep.path) as c:
        assert (await c.status())["type"] == "status"


async def test_stalled_mid_frame_client_is_dropped(served: Any) -> None:
    _, server, ep = served
    r, w = await raw(ep)
    w.write(struct.pack(">I", 100) + b'{"type":')  # and then nothing
    await w.drain()
    assert await asyncio.wait_for(r.read(), server._body_timeout + 5) == b""
    w.close()


async def test_two_subscribers_get_the_same_events(served: Any) -> None:
    _, server, ep = served
    got: list[list[dict[str, Any]]] = [[], []]

    async def listen(i: int) -> None:
        async for ev in ControlClient(ep.path).subscribe():
            got[i].append(ev)
            if ev.get("event") == "result":
                return

    tasks = [asyncio.create_task(listen(i)) for i in range(2)]
    while server.subscriber_count < 2:
        await asyncio.sleep(0.01)
    server.publish("state", state="standby", previous="off")
    server.publish("result", test_accuracy=0.9, model_path="/m.keras")
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    for events in got:
        assert [e["event"] for e in events] == ["status", "state", "result"]
        assert events[0]["state"] == "off"  # the first event is the full status
        assert events[1] == {"type": "event", "event": "state", "state": "standby", "previous": "off"}


async def test_subscriber_that_disconnects_is_dropped(served: Any) -> None:
    _, server, ep = served
    r, w = await raw(ep)
    await wire.write_frame(w, {"type": "subscribe", "proto": wire.PROTO})
    assert (await wire.read_frame(r))["type"] == "ok"
    assert (await wire.read_frame(r))["event"] == "status"
    assert server.subscriber_count == 1
    w.close()  # gone mid-stream
    for _ in range(200):
        server.publish("log", level="info", message="x")
        if server.subscriber_count == 0:
            break
        await asyncio.sleep(0.01)
    assert server.subscriber_count == 0
    async with ControlClient(ep.path) as c:
        assert (await c.status())["type"] == "status"


async def test_request_on_a_subscription_is_refused(served: Any) -> None:
    _, _, ep = served
    r, w = await raw(ep)
    await wire.write_frame(w, {"type": "subscribe", "proto": wire.PROTO})
    await wire.read_frame(r)
    await wire.read_frame(r)
    await wire.write_frame(w, {"type": "status"})
    frames = []
    while True:
        try:
            frames.append(await wire.read_frame(r, timeout=5))
        except wire.ConnectionClosed:
            break
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "bad_frame"
    w.close()


async def test_slow_subscriber_never_blocks_publishing(tmp_path: Path) -> None:
    ep = Endpoint(path=tmp_path / "c.sock")
    server = ControlServer(FakeDaemon(), ep, queue_size=8, write_timeout=0.5)
    await server.start()
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(str(ep.path))
        sock.sendall(wire.encode({"type": "subscribe", "proto": wire.PROTO}))
        while server.subscriber_count < 1:
            await asyncio.sleep(0.01)
        big = "x" * 50_000
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(2000):  # ~100 MB offered to a client that reads nothing
            server.publish("log", level="info", message=big, n=i)
        assert loop.time() - t0 < 5.0  # publish is O(1) per subscriber, never waits
        for _ in range(300):  # the stuck subscriber is disconnected after the write timeout
            if server.subscriber_count == 0:
                break
            await asyncio.sleep(0.05)
        assert server.subscriber_count == 0
        sock.close()
        async with ControlClient(ep.path) as c:
            assert (await c.status())["type"] == "status"
    finally:
        await server.close()


async def test_no_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    c = ControlClient(tmp_path / "nothing.sock")
    with pytest.raises(Unavailable) as err:
        await c.status()
    assert "no crowdd daemon is running" in str(err.value)
    assert "crowdd daemon" in str(err.value)


async def test_stale_socket_is_replaced_but_a_live_one_is_not_stolen(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on (a crashed daemon)
    server = ControlServer(FakeDaemon(), Endpoint(path=path))
    await server.start()
    try:
        second = ControlServer(FakeDaemon(), Endpoint(path=path))
        with pytest.raises(FileExistsError, match="already listening"):
            await second.start()
        async with ControlClient(path) as c:
            assert (await c.status())["type"] == "status"
    finally:
        await server.close()
    assert not path.exists()


async def test_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        await ControlServer(FakeDaemon(), Endpoint(path=path)).start()
    assert path.read_text() == "precious"


async def test_tcp_with_token(tmp_path: Path) -> None:
    token_file = tmp_path / "run" / "control.token"
    ep = Endpoint(path=None, token_file=token_file)
    handler = FakeDaemon()
    server = ControlServer(handler, ep)
    identity = Identity.load_or_create(tmp_path / "id", "node")
    await server.start(identity)
    try:
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        host, port, token, fingerprint = read_token_file(token_file)
        assert host == "127.0.0.1" and port == server.port and len(token) >= 32
        assert fingerprint == identity.fingerprint
        async with ControlClient.for_endpoint(ep) as c:  # address and token from the file
            assert (await c.donate(True))["donating"] is True
            events = []
            async for ev in ControlClient(token_file=token_file).subscribe():
                events.append(ev)
                break
            assert events[0]["event"] == "status"
        # a wrong or missing token is refused
        for first in ({"type": "status", "proto": wire.PROTO, "token": "guess"}, {"type": "status", "proto": wire.PROTO}):
            r, w = await open_tls(host, port, client_context(None), expect=fingerprint, timeout=5)
            await wire.write_frame(w, first)
            reply = await wire.read_frame(r, timeout=5)
            assert reply["code"] == "unauthorized"
            w.close()
        # a plaintext client gets nothing: the port speaks TLS only
        r, w = await asyncio.open_connection(host, port)
        await wire.write_frame(w, {"type": "status", "proto": wire.PROTO, "token": token})
        with pytest.raises((wire.ConnectionClosed, wire.FrameTimeout, ConnectionError)):
            await wire.read_frame(r, timeout=15)
        w.close()
        # a daemon impersonated on the recorded port (another certificate) is refused by the client
        impostor = Identity.load_or_create(tmp_path / "id2", "node")
        write_token_file(token_file, TokenFile(host, port, token, impostor.fingerprint))
        with pytest.raises(Unavailable, match="not this node's daemon"):
            await ControlClient(token_file=token_file).status()
        assert handler.calls == [("donate", True)]
    finally:
        await server.close()
    assert not token_file.exists()
    with pytest.raises(Unavailable):
        await ControlClient(tcp=("127.0.0.1", server.port), token_file=tmp_path / "missing").status()


def test_endpoint_for_paths(tmp_path: Path) -> None:
    from crowdd.config import Paths

    paths = Paths.under(tmp_path)
    assert Endpoint.for_paths(paths, tcp=False).path == paths.control_socket
    tcp = Endpoint.for_paths(paths, tcp=True)
    assert tcp.is_tcp and tcp.token_file == paths.runtime_dir / "control.token"
    assert json.loads(json.dumps({"x": tcp.describe()}))


@pytest.mark.parametrize("group", [
    pytest.param("daemon", marks=pytest.mark.skipif(os.geteuid() != 0, reason="only root gives a file to another group")),
    "crowdd-no-such-group",
])
async def test_system_socket_is_group_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture, group: str) -> None:
    """The service's socket goes to its group (here ``daemon`` stands in for the ``crowdd`` group
    sysusers.d makes); without that group it stays with its creator's, and the log says so."""
    import grp

    monkeypatch.setattr(control, "SYSTEM_GROUP", group)
    try:
        want: int | None = grp.getgrnam(group).gr_gid
    except KeyError:
        want = None
    ep = Endpoint(path=tmp_path / "run" / "control.sock", system=True)
    server = ControlServer(FakeDaemon(), ep)
    with caplog.at_level("WARNING", logger="crowdd.node.control"):
        await server.start()
    try:
        st = os.stat(ep.path)
        assert stat.S_IMODE(st.st_mode) == 0o660
        if group == "daemon":
            assert want is not None and want != os.getegid() and st.st_gid == want
        else:
            assert want is None and st.st_gid == os.getegid()
            assert f"group {group!r} does not exist" in caplog.text
    finally:
        await server.close()


# --------------------------------------------------------------------------- which socket a client uses


async def test_clients_fall_back_to_the_system_service_socket(tmp_path: Path) -> None:
    """No per-user socket but a system service's: `crowdd status` & co. and the TUI use the
    system one (a temp dir stands in for /run/crowdd)."""
    import argparse

    from crowdd.cli.commands import client_endpoint
    from crowdd.protocol.endpoint import client_socket

    user = tmp_path / "user-runtime" / "control.sock"
    system = tmp_path / "run-crowdd" / "control.sock"
    candidates = {"user_socket": user, "system_socket": system}
    args = argparse.Namespace(socket=None, root=None, system=False, config=None)
    assert client_socket(**candidates) == user  # neither exists: the per-user one (and its message)
    assert client_endpoint(args, **candidates) == Endpoint(path=user, system=False)

    handler = FakeDaemon()
    server = ControlServer(handler, Endpoint(path=system, system=True))
    await server.start()
    try:
        assert client_socket(**candidates) == system
        ep = client_endpoint(args, **candidates)
        assert ep == Endpoint(path=system, system=True)
        async with ControlClient.for_endpoint(ep) as c:
            assert (await c.donate(True))["donating"] is True
        assert handler.calls == [("donate", True)]
        # flags still win over the fallback
        assert client_socket(tmp_path / "x.sock", **candidates) == tmp_path / "x.sock"
        assert client_socket(None, tmp_path / "node", **candidates) == tmp_path / "node" / "run" / "control.sock"
        user.parent.mkdir()
        user.touch()  # a per-user daemon's socket exists: it is preferred
        assert client_socket(**candidates) == user
    finally:
        await server.close()

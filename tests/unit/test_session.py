"""The group session channel: auth, fan-out, end, heartbeats both ways (no TensorFlow)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import secrets
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest

from crowdd.trust import auth
from crowdd.trust.group_tls import GroupTLS
from crowdd.trust.identity import Identity
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


_IDS = tempfile.TemporaryDirectory(prefix="crowdd-test-ids-")


@functools.cache
def identity(name: str) -> Identity:
    """Member identities, made once per test run (real P-256 keys and certificates)."""
    return Identity.load_or_create(Path(_IDS.name), name)


def group(n_workers: int = 2, *, port: int = 1, token: str | None = None, index: int = 0) -> SessionPlan:
    h, ws = identity("h"), [identity(f"w{i}") for i in range(1, n_workers + 1)]
    members = [PlanMember(0, "host", "h", "127.0.0.1", MemberPorts(1, port, (1, 2)), h.cert_pem, h.fingerprint)]
    members += [PlanMember(i, "worker", f"w{i}", "127.0.0.1", MemberPorts(1, 2, (3,)), w.cert_pem, w.fingerprint)
                for i, w in enumerate(ws, 1)]
    return SessionPlan("g", token or secrets.token_hex(32), index, tuple(members), Job(),
                       DatasetRef("0" * 64, 1000, "d"), GroupSettings())


def tls_for(g: SessionPlan, name: str | None = None) -> GroupTLS:
    """Member ``g.index``'s TLS (or, with ``name``, someone holding that identity instead)."""
    return GroupTLS(identity(name or g.me.name), g if name is None else dataclasses.replace(
        g, members=tuple(dataclasses.replace(m, cert=b"", fingerprint="") if m.index == g.index else m for m in g.members)))


def listener() -> socket.socket:
    s = socket.create_server(("127.0.0.1", 0))
    s.setblocking(False)
    return s


async def host_session(g: SessionPlan, **kw: Any) -> tuple[HostSession, int, list[Member | None]]:
    changes: list[Member | None] = []
    sock = listener()
    port = sock.getsockname()[1]
    hs = HostSession(g, sock, tls=tls_for(g), heartbeat=HB, dead_after=DEAD, on_change=changes.append, **kw)
    await hs.start()
    return hs, port, changes


def worker(port: int, token: str, index: int, inbox: list[HostMessage], *, as_name: str | None = None) -> WorkerSession:
    """Worker ``index`` (its own identity, or ``as_name``'s certificate claiming that index)."""
    plan = group(max(index, 2), port=port, token=token, index=index)
    return WorkerSession(plan, tls=tls_for(plan, as_name), heartbeat=HB, dead_after=DEAD, on_message=inbox.append)


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
        cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}  # no parameter server
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
        w1 = tls_for(group(1, index=1))
        for index in (0, 5):
            reader, writer, _ = await auth.connect("127.0.0.1", port, g.token, PURPOSE, {"index": index}, ssl=w1.client(0))
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
        _reader, writer, _ = await auth.connect("127.0.0.1", port, g.token, PURPOSE, {"index": 1},
                                              ssl=tls_for(group(1, index=1)).client(0))
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

    server = await asyncio.start_server(mute_host, "127.0.0.1", 0, ssl=tls_for(group(2)).server())
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
        reader, writer, _ = await auth.connect("127.0.0.1", port, g.token, PURPOSE, {"index": 1},
                                              ssl=tls_for(group(1, index=1)).client(0))
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
        # a cluster with a parameter server: no worker's job may be pointed at one
        await wire.write_frame(writer, {"type": "train", "index": 1,
                                        "cluster": {"ps": ["127.0.0.1:1"], "worker": ["127.0.0.1:2", "127.0.0.1:3"]}})
        await asyncio.sleep(5)

    server = await asyncio.start_server(bad_host, "127.0.0.1", 0, ssl=tls_for(group(2)).server())
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


# --------------------------------------------------------------------------- attackers


def _expired_identity(directory: Path, *, expired: bool = True) -> Identity:
    """A P-256 identity whose certificate expired yesterday (or, the control, expires tomorrow)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now + datetime.timedelta(days=-1 if expired else 1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / "x.key", directory / "x.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(cert_pem)
    from crowdd.trust.identity import fingerprint_of

    return Identity(key_path, cert_path, cert_pem, fingerprint_of(cert_pem))


async def _joins(port: int, g: SessionPlan) -> None:
    """A legitimate worker 1 still gets in."""
    w = worker(port, g.token, 1, [])
    await w.connect(retry_for=2)
    await w.close()


async def test_session_port_refuses_impostors_and_keeps_serving(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An outsider's certificate, a member claiming another's index, a plaintext client, garbage
    during the handshake: each is refused (with a log line where the
    application sees it) and the host goes on serving its members."""
    from crowdd.trust.tls import client_context

    g = group(2)
    hs, port, _ = await host_session(g)
    try:
        # an outsider (a certificate not in the group), even holding the token
        outsider = identity("outsider")
        with pytest.raises(auth.AuthError):
            await auth.connect("127.0.0.1", port, g.token, PURPOSE, {"index": 1},
                               ssl=client_context(outsider, pinned=[g.host.cert]), timeout=2)
        # worker 2 (a real member) presenting its own certificate while claiming to be worker 1
        with caplog.at_level("WARNING", logger="crowdd.trust.group_tls"):
            liar = worker(port, g.token, 1, [], as_name="w2")
            await liar.connect(retry_for=0.5)  # TLS and the token pass: it is a member...
            with pytest.raises(HostLost, match="unauthorized"):  # ...but not member 1
                await asyncio.wait_for(liar.run(), 3)
            await liar.close()
        assert "claims to be member 1" in caplog.text
        assert not hs.members[1].connected
        # a plaintext client, and garbage instead of a TLS ClientHello
        for payload in (b"\x00\x00\x00\x10" + b'{"type":"hello"}', b"\x16\x03\x01garbage" * 50):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(payload)
            await w.drain()
            answer = await asyncio.wait_for(r.read(), 5)
            assert answer == b"" or answer[:1] == b"\x15", answer  # closed, or a TLS alert: never a frame
            w.close()
        await _joins(port, g)
        assert hs.members[1].connected
    finally:
        await hs.close()


async def test_a_member_s_own_expired_certificate_is_refused(tmp_path: Path) -> None:
    """Member 2's certificate is the group's (pinned: the matchmaker handed it out) but has
    expired: the host refuses it in the handshake. The control: the same slot, pinned the same
    way, with a certificate that differs only in its dates, gets in."""
    from crowdd.trust.tls import client_context

    for expired in (True, False):
        mine = _expired_identity(tmp_path / str(expired), expired=expired)
        g = group(2)
        g = dataclasses.replace(g, members=tuple(
            dataclasses.replace(m, cert=mine.cert_pem, fingerprint=mine.fingerprint) if m.index == 2 else m
            for m in g.members))
        hs, port, _ = await host_session(g)
        try:
            connect = auth.connect("127.0.0.1", port, g.token, PURPOSE, {"index": 2},
                                   ssl=client_context(mine, pinned=[g.host.cert]), timeout=2)
            if expired:
                with pytest.raises(auth.AuthError, match="handshake failed"):
                    await connect
                assert not hs.members[2].connected
            else:
                _r, w, _welcome = await connect
                w.close()
        finally:
            await hs.close()


async def test_worker_refuses_a_host_with_another_certificate() -> None:
    """A server that is not the group's host (another certificate) is refused by the worker
    before it sends anything."""
    token = secrets.token_hex(32)
    seen: list[bytes] = []

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(100))

    fake = GroupTLS(identity("outsider"), dataclasses.replace(group(2), members=tuple(
        dataclasses.replace(m, cert=b"", fingerprint="") if m.index == 0 else m for m in group(2).members)))
    server = await asyncio.start_server(impostor, "127.0.0.1", 0, ssl=fake.server())
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(SessionRefused, match="not the expected member"):
            await worker(port, token, 1, []).connect(retry_for=0.5)
        assert seen in ([], [b""])
    finally:
        server.close()


async def test_away_and_back_are_told_to_the_host() -> None:
    """A worker whose machine turns busy says so before it suspends; the host sees it away
    (its channel stays up), then back."""
    g = group(1)
    seen: list[tuple[int, str]] = []
    hs, port, _ = await host_session(g, on_message=lambda m, msg: seen.append((m.index, type(msg).__name__)))
    w = worker(port, g.token, 1, [])
    try:
        await w.connect(retry_for=5)
        run = asyncio.create_task(w.run())
        w.job_started()
        w.away("the user is active (idle for 0 min)")
        await _until(lambda: hs.members[1].away is not None)
        assert hs.members[1].state == "away" and hs.members[1].alive
        assert "user is active" in (hs.members[1].away or "")
        w.back()
        await _until(lambda: hs.members[1].away is None)
        assert hs.members[1].state == "training"
        assert [n for i, n in seen if i == 1][-2:] == ["Away", "Back"]
        run.cancel()
    finally:
        await w.close()
        await hs.close()


async def _until(cond: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_lost_worker_rejoins_its_slot_while_training_only() -> None:
    """A worker that went silent (frozen) is given up; once training is open to rejoins it
    comes back to its own slot with its TF server still running. Before that, and for an
    impostor holding another member's certificate, the door stays shut."""
    g = group(2)
    rejoined: list[tuple[int, bool]] = []
    hs, port, _ = await host_session(g, on_rejoin=lambda m, running: rejoined.append((m.index, running)))
    w1 = worker(port, g.token, 1, [])
    w1b = worker(port, g.token, 1, [])
    try:
        await w1.connect(retry_for=5)
        run = asyncio.create_task(w1.run())
        w1.job_started()
        await _until(lambda: hs.members[1].started)
        run.cancel()  # this worker freezes: no more pings
        await asyncio.gather(run, return_exceptions=True)
        await _until(lambda: not hs.members[1].alive, timeout=5 * DEAD)
        # not yet training: no rejoin
        await w1b.connect(retry_for=0.5, hello={"rejoin": True, "job": "running"})
        with pytest.raises(HostLost, match="already in"):
            await asyncio.wait_for(w1b.run(), 3)
        await w1b.drop_channel()
        hs.rejoin_open = True
        hs.members[1].slot = 1
        # worker 2's certificate claiming slot 1 on a rejoin: refused like any other claim
        liar = worker(port, g.token, 1, [], as_name="w2")
        await liar.connect(retry_for=0.5, hello={"rejoin": True, "job": "running"})
        with pytest.raises(HostLost, match="unauthorized"):
            await asyncio.wait_for(liar.run(), 3)
        await liar.close()
        assert not hs.members[1].alive and rejoined == []
        # the real worker 1 comes back
        await w1b.connect(retry_for=2, hello={"rejoin": True, "job": "running"})
        run_b = asyncio.create_task(w1b.run())
        await _until(lambda: hs.members[1].alive)
        m = hs.members[1]
        assert m.started and m.state == "training" and m.rejoins == 1 and rejoined == [(1, True)]
        await asyncio.sleep(3 * DEAD)  # its new channel's heartbeats keep it in
        assert hs.members[1].alive
        run_b.cancel()
    finally:
        await w1.close()
        await w1b.close()
        await hs.close()


async def test_a_newcomer_gets_in_only_once_the_host_adds_it() -> None:
    """Join in progress: a volunteer the matchmaker sent to a running session is refused until
    the host adds it (its certificate pinned at the next index); then it joins like anyone."""
    g = group(1)
    hs, port, _ = await host_session(g)
    newcomer = group(2, port=port, token=g.token, index=2)  # the newcomer's own plan: w2 appended
    try:
        early = WorkerSession(newcomer, tls=tls_for(newcomer), heartbeat=HB, dead_after=DEAD, on_message=[].append)
        with pytest.raises((SessionRefused, HostLost)):
            await early.connect(retry_for=0.5)  # the host does not know its certificate yet
            await asyncio.wait_for(early.run(), 3)
        await early.close()
        m = hs.add_member(newcomer.members[2])
        assert m.index == 2 and hs.members[2] is m and hs.plan.size == 3
        ws = WorkerSession(newcomer, tls=tls_for(newcomer), heartbeat=HB, dead_after=DEAD, on_message=[].append)
        await ws.connect(retry_for=2)
        run = asyncio.create_task(ws.run())
        await _until(lambda: hs.members[2].connected)
        ws.ready()
        await _until(lambda: hs.members[2].ready)
        with pytest.raises(ValueError):  # indices only grow by one
            hs.add_member(dataclasses.replace(newcomer.members[2], index=7))
        run.cancel()
        await ws.close()
    finally:
        await hs.close()

"""Replication over mutual TLS 1.3 pinned to the group (real sockets): data arrives intact, and
outsiders, a member posing as another, plaintext, garbage and a stalled handshake are refused,
while a legitimate member is still served afterwards (a whole fetch completes)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from crowdd import wire
from crowdd.trust import auth
from crowdd.data.cache import DatasetCache
from crowdd.trust.group_tls import GroupTLS
from crowdd.trust.identity import Identity
from crowdd.data.manifest import Manifest
from crowdd.protocol import data
from crowdd.replication import ChunkStore, DataServer
from crowdd.replication.replicator import Peer, Replicator, fetch_manifest
from crowdd.testing.identities import identity
from crowdd.testing.replication_node import group_tls
from crowdd.trust.tls import client_context

pytestmark = pytest.mark.timeout(60)

N = 3


@dataclasses.dataclass
class Group:
    """Member 0 serves the data over TLS; members 1 and 2 fetch. ``accepted`` counts the
    connections that got past TLS to the token handshake."""

    tls: list[GroupTLS]
    token: str
    manifest: Manifest
    blob: bytes
    server: DataServer
    port: int
    tmp: Path
    accepted: list[Any]
    fetches: int = 0

    def peers(self) -> list[Peer]:
        return [Peer(i, "127.0.0.1", self.port if i == 0 else 1) for i in range(len(self.tls))]

    async def fetch(self, index: int = 1) -> bytes:
        """A whole replication of the dataset by member ``index`` into a fresh cache."""
        self.fetches += 1
        rep = Replicator(index, self.peers(), self.token, self.manifest,
                         DatasetCache(self.tmp / f"c{index}-{self.fetches}"), route="star",
                         tls=self.tls[index], stall_timeout=2.0, give_up=4.0)
        return Path(await asyncio.wait_for(rep.run(), 30)).read_bytes()

    async def still_serves_a_member(self) -> None:
        before = self.server.served_chunks
        assert await self.fetch(1) == self.blob
        assert self.server.served_chunks == before + self.manifest.num_chunks


def tls_group() -> list[GroupTLS]:
    return group_tls([identity(f"tls{i}") for i in range(N)])


@pytest.fixture
async def group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Group]:
    accepted: list[Any] = []
    real_accept = auth.accept

    async def counting_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *a: Any,
                              **kw: Any) -> dict[str, Any]:
        accepted.append(writer.get_extra_info("peername"))
        return await real_accept(reader, writer, *a, **kw)

    monkeypatch.setattr(auth, "accept", counting_accept)
    tls = tls_group()
    tls[0].handshake_timeout = 1.0  # this server's: a stalled handshake is dropped quickly
    blob = os.urandom(2 * (1 << 20) + 12345)
    src = tmp_path / "data.bin"
    src.write_bytes(blob)
    manifest = Manifest.build(src, chunk_size=1 << 20, name="x")
    token = secrets.token_hex(16)
    server = DataServer(token, manifest, ChunkStore.complete(src, manifest), host="127.0.0.1", group_size=N,
                        stall_timeout=2.0, tls=tls[0])
    port = await server.start()
    try:
        yield Group(tls, token, manifest, blob, server, port, tmp_path, accepted)
    finally:
        await server.close()
        server.store.close()


async def _read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


def _no_frame(answer: bytes) -> bool:
    """Closed, or a TLS alert record (content type 21): never a crowdd frame."""
    return answer == b"" or answer[:1] == b"\x15"


# --------------------------------------------------------------------------- members


async def test_a_member_fetches_the_data_over_tls_1_3(group: Group) -> None:
    assert await group.fetch(1) == group.blob
    got = await fetch_manifest(group.peers()[0], group.token, 2, group.manifest.digest(), tls=group.tls[2])
    assert got.digest() == group.manifest.digest()
    _, writer, _ = await auth.connect("127.0.0.1", group.port, group.token, data.PURPOSE, data.make_hello(2),
                                      timeout=2, ssl=group.tls[2].client(0))
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object is not None and ssl_object.version() == "TLSv1.3"
        assert group.tls[0].member_of(writer) == 0  # the server presented member 0's certificate
    finally:
        await wire.close_writer(writer)


async def test_a_member_refuses_a_data_server_with_another_certificate(group: Group, tmp_path: Path) -> None:
    """A fetcher pins the member it dials: an impostor server holding the token is refused
    before any frame, and the fetcher falls back to nobody else (there is nobody else here)."""
    impostor_id = Identity.load_or_create(tmp_path / "imp", "i")
    ids = [impostor_id] + [t.identity for t in group.tls[1:]]
    impostor_tls = group_tls(ids)[0]
    fake = DataServer(group.token, group.manifest, group.server.store, host="127.0.0.1", group_size=N,
                      tls=impostor_tls)
    port = await fake.start()
    try:
        with pytest.raises(auth.AuthError, match="not the expected member") as err:
            await fetch_manifest(Peer(0, "127.0.0.1", port), group.token, 1, group.manifest.digest(),
                                 tls=group.tls[1])
        assert not err.value.unreachable
        assert fake.served_chunks == 0
    finally:
        await fake.close()


# --------------------------------------------------------------------------- attackers


async def test_a_certificate_outside_the_group_is_refused_in_the_handshake(group: Group, tmp_path: Path) -> None:
    """An outsider that even holds the token, and pins the server correctly: its certificate is
    not a member's, so the server's TLS handshake fails and no frame ever reaches the server."""
    outsider = Identity.load_or_create(tmp_path / "outsider", "o")
    with pytest.raises(auth.AuthError):
        await auth.connect("127.0.0.1", group.port, group.token, data.PURPOSE, data.make_hello(1), timeout=2,
                           ssl=client_context(outsider, pinned=[group.tls[0].identity.cert_pem]))
    assert group.accepted == []
    await group.still_serves_a_member()


async def test_a_client_without_a_certificate_is_refused_in_the_handshake(group: Group) -> None:
    with pytest.raises(auth.AuthError):
        await auth.connect("127.0.0.1", group.port, group.token, data.PURPOSE, data.make_hello(1), timeout=2,
                           ssl=client_context(None, pinned=[group.tls[0].identity.cert_pem]))
    assert group.accepted == []
    await group.still_serves_a_member()


async def test_the_servers_own_certificate_is_not_a_client(group: Group) -> None:
    """Member 0's certificate is not among those its own server accepts (a stolen copy of the
    server's identity cannot be used to ask it for data as another member)."""
    with pytest.raises(auth.AuthError):
        await auth.connect("127.0.0.1", group.port, group.token, data.PURPOSE, data.make_hello(1), timeout=2,
                           ssl=group.tls[0].client(0))
    assert group.accepted == []
    await group.still_serves_a_member()


@pytest.mark.parametrize("claimed", [1, 0])
async def test_a_member_claiming_another_members_index_is_refused(
    group: Group, caplog: pytest.LogCaptureFixture, claimed: int
) -> None:
    """Member 2 presents its own valid certificate and holds the token but says it is member
    ``claimed``: it gets through TLS and the token proof, then is refused with ``unauthorized``
    and a log line naming the claim and the certificate it presented."""
    with caplog.at_level(logging.INFO):
        reader, writer, _ = await auth.connect("127.0.0.1", group.port, group.token, data.PURPOSE,
                                               data.make_hello(claimed), timeout=2, ssl=group.tls[2].client(0))
        try:
            await wire.write_frame(writer, data.GetRequest(tuple(range(group.manifest.num_chunks))).to_frame())
            reply = await wire.read_frame(reader, timeout=5)
            assert reply["type"] == "error" and reply["code"] == "unauthorized"
            with pytest.raises(wire.ConnectionClosed):
                await wire.read_frame(reader, timeout=5)
        finally:
            await wire.close_writer(writer)
    assert group.server.served_chunks == 0
    warnings = [r for r in caplog.records if r.name == "crowdd.trust.group_tls" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"claims to be member {claimed} but presents certificate {group.tls[2].identity.fingerprint}" \
        in warnings[0].getMessage()
    assert any(r.name == "crowdd.replication.server" and "refused data client" in r.getMessage()
               and f"not member {claimed}'s" in r.getMessage() for r in caplog.records)
    await group.still_serves_a_member()


async def test_a_member_without_the_token_is_refused_after_tls(group: Group, caplog: pytest.LogCaptureFixture) -> None:
    """The token proof stays as a second factor: a member's certificate alone is not enough."""
    with caplog.at_level(logging.INFO, logger="crowdd.trust.auth"), pytest.raises(auth.AuthError) as err:
        await auth.connect("127.0.0.1", group.port, "not-the-token", data.PURPOSE, data.make_hello(1), timeout=2,
                           ssl=group.tls[1].client(0))
    assert err.value.code == "unauthorized"
    assert "refused data connection: group membership not proved" in caplog.text
    await group.still_serves_a_member()


async def _refused(group: Group, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The server closed (or alerted) without a frame, never reached the token handshake,
    and still serves a member afterwards."""
    assert _no_frame(await _read_all(reader))
    writer.close()
    assert group.accepted == []
    await group.still_serves_a_member()


async def test_a_plaintext_client_on_the_tls_port_is_refused(group: Group) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", group.port)
    try:
        writer.write(wire.encode({"type": "hello", "proto": wire.PROTO, "purpose": data.PURPOSE,
                                  "nonce": "0" * 64, "hello": data.make_hello(1)}))
        await writer.drain()
        await _refused(group, reader, writer)
    finally:
        writer.close()


@pytest.mark.parametrize("payload", [
    pytest.param(b"\x16\x03\x01\x01\x00" + b"\x01" + os.urandom(255), id="garbage-client-hello"),
    pytest.param(os.urandom(4096), id="random-bytes"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
])
async def test_garbage_instead_of_a_client_hello_is_refused(group: Group, payload: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", group.port)
    try:
        writer.write(payload)
        await writer.drain()
        await _refused(group, reader, writer)
    finally:
        writer.close()


async def test_garbage_in_the_middle_of_the_handshake_is_refused(group: Group) -> None:
    """A real member's ClientHello, then garbage where its certificate and Finished belong."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = group.tls[1].client(0).wrap_bio(incoming, outgoing, server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        tls_client.do_handshake()
    reader, writer = await asyncio.open_connection("127.0.0.1", group.port)
    try:
        writer.write(outgoing.read())  # ClientHello
        await writer.drain()
        server_flight = await asyncio.wait_for(reader.read(65536), 5)
        assert server_flight[:1] == b"\x16"  # the ServerHello record
        writer.write(b"\x17\x03\x03\x01\x00" + os.urandom(256))  # an "encrypted" record that is noise
        await writer.drain()
        await _refused(group, reader, writer)
    finally:
        writer.close()


async def test_a_stalled_handshake_is_dropped(group: Group) -> None:
    """A client that connects and never finishes its handshake is closed after the server's
    handshake timeout (1 s here), and meanwhile members are served."""
    reader, writer = await asyncio.open_connection("127.0.0.1", group.port)
    staller = writer.get_extra_info("sockname")
    try:
        await group.still_serves_a_member()
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert _no_frame(await _read_all(reader, timeout=10))
        assert loop.time() - start < 5
    finally:
        writer.close()
    assert staller not in group.accepted and len(group.accepted) == 1  # the member's connection only

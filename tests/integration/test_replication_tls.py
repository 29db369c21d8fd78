"""Replication over mutual TLS pinned to the group (real sockets): data arrives intact, and
outsiders, a member posing as another, plaintext and garbage are refused while members are
still served."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
from pathlib import Path

import pytest

from crowdd import auth
from crowdd.cache import DatasetCache
from crowdd.group_tls import GroupTLS
from crowdd.identity import Identity
from crowdd.manifest import Manifest
from crowdd.protocol import data
from crowdd.replication import ChunkStore, DataServer
from crowdd.replication.replicator import Peer, Replicator, fetch_manifest
from crowdd.testing.tunnel_bridge import plan_for
from crowdd.tls import client_context

pytestmark = pytest.mark.timeout(60)


@dataclasses.dataclass
class Group:
    tls: list[GroupTLS]
    token: str
    manifest: Manifest
    blob: bytes
    server: DataServer
    port: int

    def peers(self) -> list[Peer]:
        return [Peer(i, "127.0.0.1", self.port if i == 0 else 1) for i in range(len(self.tls))]


@pytest.fixture
async def group(tmp_path: Path) -> Group:
    ids = [Identity.load_or_create(tmp_path / "ids", f"m{i}") for i in range(3)]
    tls = [GroupTLS(ids[i], plan_for(ids, i)) for i in range(3)]
    blob = os.urandom(3 * (1 << 20) + 12345)
    src = tmp_path / "data.bin"
    src.write_bytes(blob)
    manifest = Manifest.build(src, chunk_size=1 << 20, name="x")
    token = secrets.token_hex(16)
    server = DataServer(token, manifest, ChunkStore.complete(src, manifest), host="127.0.0.1", group_size=3,
                        stall_timeout=2.0, tls=tls[0])
    port = await server.start()
    g = Group(tls, token, manifest, blob, server, port)
    yield g  # type: ignore[misc]
    await server.close()
    server.store.close()


async def _fetch(g: Group, index: int, tmp_path: Path) -> bytes:
    rep = Replicator(index, g.peers(), g.token, g.manifest, DatasetCache(tmp_path / f"c{index}"), route="star",
                     tls=g.tls[index], stall_timeout=2.0, give_up=4.0)
    return Path(await rep.run()).read_bytes()


async def test_a_member_fetches_the_data_over_tls(group: Group, tmp_path: Path) -> None:
    assert await _fetch(group, 1, tmp_path) == group.blob
    assert (await fetch_manifest(group.peers()[0], group.token, 2, group.manifest.digest(), tls=group.tls[2])).digest() \
        == group.manifest.digest()


async def test_attackers_are_refused_and_members_still_served(
    group: Group, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    g = group
    hello = data.make_hello(1)
    # an outsider's certificate, holding the token: the TLS handshake fails
    outsider = Identity.load_or_create(tmp_path / "outsider", "o")
    with pytest.raises(auth.AuthError):
        await auth.connect("127.0.0.1", g.port, g.token, data.PURPOSE, hello, timeout=2,
                           ssl=client_context(outsider, pinned=[g.tls[1].identity.cert_pem, g.tls[0].identity.cert_pem]))
    # member 2 (a real member) claiming to be member 1: refused after the handshake, with a log line
    with caplog.at_level(logging.WARNING, logger="crowdd.group_tls"):
        r, w, _ = await auth.connect("127.0.0.1", g.port, g.token, data.PURPOSE, hello, timeout=2, ssl=g.tls[2].client(0))
        from crowdd import wire

        await wire.write_frame(w, data.ManifestRequest().to_frame())
        reply = await wire.read_frame(r, timeout=5)
        assert reply["type"] == "error" and reply["code"] == "unauthorized"
        w.close()
    assert "claims to be member 1" in caplog.text
    # plaintext, and garbage instead of a ClientHello
    for payload in (wire.encode({"type": "hello", "proto": wire.PROTO}), b"\x16\x03\x01" + os.urandom(300)):
        r, w = await asyncio.open_connection("127.0.0.1", g.port)
        w.write(payload)
        await w.drain()
        answer = await asyncio.wait_for(r.read(), 5)
        assert answer == b"" or answer[:1] == b"\x15"  # closed or a TLS alert: never a frame
        w.close()
    # and the real member 1 still gets everything
    assert await _fetch(g, 1, tmp_path) == g.blob


async def test_a_member_refuses_a_data_server_with_another_certificate(group: Group, tmp_path: Path) -> None:
    """A fetcher pins the member it dials: an impostor server is refused before any data."""
    impostor_id = Identity.load_or_create(tmp_path / "imp", "i")
    ids = [impostor_id] + [t.identity for t in group.tls[1:]]
    impostor_tls = GroupTLS(impostor_id, plan_for(ids, 0))
    fake = DataServer(group.token, group.manifest, group.server.store, host="127.0.0.1", group_size=3,
                      tls=impostor_tls)
    port = await fake.start()
    try:
        with pytest.raises(auth.AuthError, match="not the expected member"):
            await fetch_manifest(Peer(0, "127.0.0.1", port), group.token, 1, group.manifest.digest(), tls=group.tls[1])
        assert fake.served_chunks == 0
    finally:
        await fake.close()

"""Replication on loopback: real sockets, all mutual TLS pinned to the group (as between real
nodes); in-process nodes for the fast cases, real processes for the group of 8 and the kill -9
of a relay. Attacks on the TLS layer are in test_replication_tls.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from crowdd import wire
from crowdd.trust import auth
from crowdd.data.cache import DatasetCache
from crowdd.trust.group_tls import GroupTLS
from crowdd.data.manifest import Manifest, ManifestError
from crowdd.protocol import data
from crowdd.replication.errors import ReplicationError
from crowdd.replication.replicator import Peer, Progress, Replicator, fetch_manifest
from crowdd.replication.server import DataServer
from crowdd.replication.store import ChunkStore
from crowdd.route import RouteError, node_plan
from crowdd.testing.identities import identity
from crowdd.testing.replication_cluster import NodeCluster
from crowdd.testing.replication_node import group_tls

CHUNK = 64 << 10


def tls_for(n: int) -> list[GroupTLS]:
    """Each member's TLS for a group of ``n`` (identities made once per test run)."""
    return group_tls([identity(f"rep{i}") for i in range(n)])


def make_file(path: Path, size: int, chunk: int = CHUNK) -> Manifest:
    path.write_bytes(os.urandom(size))
    return Manifest.build(path, chunk_size=chunk, name="t")


@dataclass
class Group:
    """n in-process nodes: node 0 serves ``src``; everyone else has an empty cache."""

    tmp: Path
    n: int
    manifest: Manifest
    src: Path
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    route: str = "binomial"
    stall: float = 2.0
    stores: dict[int, ChunkStore] = field(default_factory=dict)
    servers: dict[int, DataServer] = field(default_factory=dict)
    peers: list[Peer] = field(default_factory=list)
    tls: list[GroupTLS] = field(init=False)

    def __post_init__(self) -> None:
        self.tls = tls_for(self.n)

    def cache(self, i: int) -> DatasetCache:
        return DatasetCache(self.tmp / f"cache{i}")

    async def start(self, overrides: dict[int, DataServer] | None = None) -> None:
        overrides = overrides or {}
        for i in range(self.n):
            if i in overrides:
                server = overrides[i]
            else:
                store = (ChunkStore.complete(self.src, self.manifest) if i == 0
                         else ChunkStore.open(self.cache(i), self.manifest))
                self.stores[i] = store
                server = DataServer(self.token, self.manifest, store, host="127.0.0.1",
                                    targets=node_plan(self.n, i, self.route).targets, group_size=self.n,
                                    stall_timeout=self.stall, late_bound=0.5, tls=self.tls[i])
            self.servers[i] = server
            port = await server.start()
            self.peers.append(Peer(i, "127.0.0.1", port))

    def replicator(self, i: int, **kw: object) -> Replicator:
        return Replicator(i, self.peers, self.token, self.manifest, self.cache(i), route=self.route,
                          stall_timeout=self.stall, store=self.stores.get(i), tls=self.tls[i],
                          **kw)  # type: ignore[arg-type]

    async def close(self) -> None:
        for server in self.servers.values():
            await server.close()
        for store in self.stores.values():
            store.close()


@pytest.fixture
async def group_factory(tmp_path: Path) -> AsyncIterator[object]:
    groups: list[Group] = []

    async def make(n: int = 8, size: int = 3 * CHUNK * 8 + 123, route: str = "binomial",
                   overrides: dict[int, DataServer] | None = None, **kw: object) -> Group:
        src = tmp_path / "data.bin"
        manifest = make_file(src, size)
        g = Group(tmp_path, n, manifest, src, route=route, **kw)  # type: ignore[arg-type]
        groups.append(g)
        await g.start(overrides)
        return g

    try:
        yield make
    finally:
        for g in groups:
            await g.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- in process


@pytest.mark.parametrize("route", ["binomial", "chain", "star"])
async def test_eight_nodes_all_end_with_a_verified_copy(group_factory, route: str) -> None:  # type: ignore[no-untyped-def]
    g: Group = await group_factory(route=route)
    reps = [g.replicator(i) for i in range(1, g.n)]
    paths = await asyncio.wait_for(asyncio.gather(*(r.run() for r in reps)), 60)
    for r, path in zip(reps, paths):
        assert digest(path) == g.manifest.sha256
        assert path == g.cache(r.index).data_path(g.manifest)
        assert r.sources_used == [node_plan(g.n, r.index, route).source]
        assert not g.cache(r.index).partial_path(g.manifest).exists()


async def test_progress_reports_bytes_and_source(group_factory) -> None:  # type: ignore[no-untyped-def]
    g: Group = await group_factory(n=2)
    seen: list[Progress] = []
    await asyncio.wait_for(g.replicator(1, on_progress=seen.append).run(), 30)
    assert seen[0].done_bytes == 0
    assert seen[-1] == Progress(g.manifest.size, g.manifest.size, None)
    assert any(p.source == 0 for p in seen)
    dones = [p.done_bytes for p in seen]
    assert dones == sorted(dones)


async def test_cache_hit_skips_the_transfer(group_factory) -> None:  # type: ignore[no-untyped-def]
    g: Group = await group_factory(n=2)
    cache = g.cache(1)
    cache.add_file(g.src, g.manifest)
    g.stores[1].close()
    del g.stores[1]
    rep = g.replicator(1)
    path = await asyncio.wait_for(rep.run(), 10)
    assert path == cache.data_path(g.manifest)
    assert rep.sources_used == []
    assert g.servers[0].served_chunks == 0
    # ... and the source was told not to wait for this target
    assert 1 in g.servers[0].turns.done


async def test_resume_fetches_only_missing_chunks(group_factory) -> None:  # type: ignore[no-untyped-def]
    g: Group = await group_factory(n=2)
    g.stores[1].close()
    del g.stores[1]
    cache = g.cache(1)
    data = g.src.read_bytes()
    half = g.manifest.num_chunks // 2
    partial = bytearray(len(data))
    partial[: half * CHUNK] = data[: half * CHUNK]
    cache.partial_path(g.manifest).write_bytes(bytes(partial))
    rep = g.replicator(1)
    path = await asyncio.wait_for(rep.run(), 30)
    assert digest(path) == g.manifest.sha256
    assert g.servers[0].served_chunks == g.manifest.num_chunks - half


async def test_corrupt_chunk_is_detected_and_refetched_elsewhere(group_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Node 1 serves a file with one flipped byte; node 3 (its target) refetches from another holder."""
    src = tmp_path / "data.bin"
    manifest = make_file(src, 20 * CHUNK)
    bad = tmp_path / "bad.bin"
    raw = bytearray(src.read_bytes())
    raw[5 * CHUNK + 7] ^= 0xFF
    bad.write_bytes(bytes(raw))
    token = secrets.token_hex(16)
    bad_store = ChunkStore.complete(bad, manifest)
    g = Group(tmp_path, 4, manifest, src, token=token)
    bad_server = DataServer(token, manifest, bad_store, host="127.0.0.1", targets=(3,), group_size=4,
                            stall_timeout=2.0, tls=g.tls[1])
    try:
        await g.start({1: bad_server})
        rep3 = g.replicator(3)
        rep2 = g.replicator(2)
        p3, _ = await asyncio.wait_for(asyncio.gather(rep3.run(), rep2.run()), 30)
        assert digest(p3) == manifest.sha256
        assert rep3.corrupt_chunks == 1
        assert rep3.bad == {1}
        assert rep3.sources_used[0] == 1 and rep3.sources_used[-1] in (0, 2)
    finally:
        await g.close()
        bad_store.close()


async def test_peer_that_stalls_mid_frame_is_dropped(tmp_path: Path) -> None:
    """Node 1's source announces a chunk, sends half of it and goes silent."""
    src = tmp_path / "data.bin"
    manifest = make_file(src, 10 * CHUNK)
    token = secrets.token_hex(16)
    stalled = asyncio.Event()

    async def staller(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await auth.accept(reader, writer, token, "data", timeout=2)
            req = await wire.read_frame(reader, timeout=2)
            if not isinstance(data.check_request(req, manifest.num_chunks), data.GetRequest):
                return
            _, length = manifest.chunk_span(0)
            writer.write(wire.encode(data.Chunk(0, length).to_frame()))
            writer.write(src.read_bytes()[: length // 2])
            await writer.drain()
            stalled.set()
            await asyncio.sleep(30)
        except (auth.AuthError, wire.ConnectionClosed, wire.FrameTimeout):
            pass
        finally:
            writer.close()

    tls = tls_for(3)
    bad = await asyncio.start_server(staller, "127.0.0.1", 0, ssl=tls[1].server())  # a member gone wrong
    host_store = ChunkStore.complete(src, manifest)
    host = DataServer(token, manifest, host_store, host="127.0.0.1", group_size=3, stall_timeout=1.0, tls=tls[0])
    try:
        peers = [Peer(0, "127.0.0.1", await host.start()), Peer(1, "127.0.0.1", bad.sockets[0].getsockname()[1])]
        # chain 0 → 1 → 2: node 2's source is the staller
        peers.append(Peer(2, "127.0.0.1", 1))
        rep = Replicator(2, peers, token, manifest, DatasetCache(tmp_path / "c2"), route="chain", stall_timeout=1.0,
                         tls=tls[2])
        path = await asyncio.wait_for(rep.run(), 30)
        assert stalled.is_set()
        assert digest(path) == manifest.sha256
        assert 1 in rep.failed and rep.sources_used == [1, 0]
    finally:
        bad.close()
        await host.close()
        host_store.close()


async def test_dead_source_is_replaced_by_another_holder(group_factory) -> None:  # type: ignore[no-untyped-def]
    g: Group = await group_factory(n=4)
    await g.servers[1].close()  # node 1 (source of 3) is gone before 3 starts
    rep = g.replicator(3)
    path = await asyncio.wait_for(rep.run(), 30)
    assert digest(path) == g.manifest.sha256
    assert rep.sources_used[-1] in (0, 2) and 1 in rep.failed


async def test_wrong_token_is_refused(group_factory) -> None:  # type: ignore[no-untyped-def]
    g: Group = await group_factory(n=2)
    with pytest.raises(auth.AuthError) as err:
        await auth.connect("127.0.0.1", g.peers[0].port, "wrong", "data", {"index": 1}, timeout=2,
                           ssl=g.tls[1].client(0))
    assert err.value.code == "unauthorized"
    rep = Replicator(1, g.peers, "wrong", g.manifest, g.cache(1), stall_timeout=0.5, give_up=1.0, tls=g.tls[1])
    with pytest.raises(ReplicationError, match="no holder"):
        await asyncio.wait_for(rep.run(), 20)
    assert g.servers[0].served_chunks == 0


@pytest.mark.parametrize(
    ("request_frame", "code"),
    [
        ({"type": "get", "chunks": [10_000]}, "bad_field"),
        ({"type": "get", "chunks": "all"}, "bad_field"),
        ({"type": "get", "chunks": [True]}, "bad_field"),
        ({"type": "get", "chunks": [0], "wait": "yes"}, "bad_field"),
        ({"type": "delete"}, "unknown_type"),
    ],
)
async def test_bad_requests_get_an_error_frame(group_factory, request_frame: dict, code: str) -> None:  # type: ignore[no-untyped-def]
    g: Group = await group_factory(n=2)
    reader, writer, _ = await auth.connect("127.0.0.1", g.peers[0].port, g.token, "data", {"index": 1}, timeout=2,
                                           ssl=g.tls[1].client(0))
    await wire.write_frame(writer, request_frame)
    answer = await wire.read_frame(reader, timeout=2)
    await wire.close_writer(writer)
    assert answer["type"] == "error" and answer["code"] == code
    # the server keeps serving everyone else
    assert digest(await asyncio.wait_for(g.replicator(1).run(), 30)) == g.manifest.sha256


async def test_bad_hello_index_is_refused(group_factory) -> None:  # type: ignore[no-untyped-def]
    g: Group = await group_factory(n=2)
    for hello in ({"index": 99}, {"index": "1"}, {}):
        reader, writer, _ = await auth.connect("127.0.0.1", g.peers[0].port, g.token, "data", hello, timeout=2,
                                               ssl=g.tls[1].client(0))
        await wire.write_frame(writer, data.HaveRequest().to_frame())
        answer = await wire.read_frame(reader, timeout=2)
        await wire.close_writer(writer)
        assert answer["code"] == "bad_field" and answer["field"] == "index"


async def test_manifest_is_fetched_and_checked_against_the_digest(group_factory) -> None:  # type: ignore[no-untyped-def]
    g: Group = await group_factory(n=2)
    got = await fetch_manifest(g.peers[0], g.token, 1, g.manifest.digest(), tls=g.tls[1])
    assert got == g.manifest
    with pytest.raises(ManifestError, match="digest"):
        await fetch_manifest(g.peers[0], g.token, 1, "0" * 64, tls=g.tls[1])


async def test_source_serves_targets_in_plan_order_and_skips_a_late_one(tmp_path: Path) -> None:
    """Targets (1, 2, 3): 3 connects first but 1 and 2 go first; when 1 never shows up, 2 is not blocked."""
    src = tmp_path / "data.bin"
    manifest = make_file(src, 8 * CHUNK)
    token = secrets.token_hex(16)
    store = ChunkStore.complete(src, manifest)
    tls = tls_for(4)
    server = DataServer(token, manifest, store, host="127.0.0.1", targets=(1, 2, 3), group_size=4,
                        stall_timeout=2.0, late_bound=0.6, keepalive=0.1, tls=tls[0])
    order: list[int] = []
    try:
        port = await server.start()

        async def fetch(i: int, delay: float) -> None:
            await asyncio.sleep(delay)
            reader, writer, _ = await auth.connect("127.0.0.1", port, token, "data", {"index": i}, timeout=2,
                                                   ssl=tls[i].client(0))
            await wire.write_frame(writer, data.GetRequest(tuple(range(manifest.num_chunks))).to_frame())
            first = True
            while True:
                frame, blob = await wire.read_message(reader, timeout=5)
                msg = data.check_stream_frame(frame, len(blob), manifest.num_chunks)
                if isinstance(msg, data.Chunk) and first:
                    order.append(i)
                    first = False
                if isinstance(msg, data.End):
                    break
            await wire.close_writer(writer)

        # 1 is late (never comes in time), 3 is early, 2 comes a bit later
        await asyncio.wait_for(asyncio.gather(fetch(3, 0.0), fetch(2, 0.2)), 20)
        assert order == [2, 3]
        assert server.turns.skipped == {1}
    finally:
        await server.close()
        store.close()


def test_chunk_store_refuses_a_chunk_that_does_not_match(tmp_path: Path) -> None:
    src = tmp_path / "data.bin"
    manifest = make_file(src, 3 * CHUNK)
    store = ChunkStore.open(DatasetCache(tmp_path / "c"), manifest)
    try:
        assert not store.write(1, b"x" * CHUNK)
        assert store.count == 0 and store.missing() == [0, 1, 2]
        assert store.write(1, src.read_bytes()[CHUNK: 2 * CHUNK])
        assert store.held() == (False, True, False)
        with pytest.raises(ReplicationError, match="missing"):
            store.finish(DatasetCache(tmp_path / "c"))
    finally:
        store.close()


def test_replicator_rejects_an_index_outside_the_group(tmp_path: Path) -> None:
    src = tmp_path / "data.bin"
    manifest = make_file(src, CHUNK)
    tls = tls_for(2)[0]
    with pytest.raises(RouteError, match="out of range"):
        Replicator(5, [Peer(0, "127.0.0.1", 1)], "t", manifest, DatasetCache(tmp_path / "c"), tls=tls)
    with pytest.raises(ValueError, match="numbered"):
        Replicator(0, [Peer(0, "127.0.0.1", 1), Peer(0, "127.0.0.1", 2)], "t", manifest, DatasetCache(tmp_path / "c"),
                   tls=tls)
    with pytest.raises(ValueError, match="token"):
        Replicator(0, [Peer(0, "127.0.0.1", 1)], "", manifest, DatasetCache(tmp_path / "c"), tls=tls)


# --------------------------------------------------------------------------- real processes


@pytest.fixture
def cluster_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    clusters: list[NodeCluster] = []

    def make(n: int, size: int, route: str = "binomial", chunk: int = CHUNK, **kw: object) -> tuple[NodeCluster, Manifest]:
        src = tmp_path / f"data-{route}.bin"
        manifest = make_file(src, size, chunk)
        mpath = tmp_path / f"manifest-{route}.json"
        mpath.write_bytes(manifest.to_json())
        extra: dict[int, dict[str, Any]] = dict(kw.pop("extra", None) or {})  # type: ignore[call-overload]
        extra.setdefault(0, {})["serve_file"] = str(src)
        c = NodeCluster(tmp_path / f"run-{route}", n=n, token=secrets.token_hex(16), manifest_path=mpath,
                        route=route, extra=extra, **kw)  # type: ignore[arg-type]
        clusters.append(c)
        c.start(timeout=60)
        return c, manifest

    try:
        yield make
    finally:
        for c in clusters:
            c.close()


@pytest.mark.parametrize("route", ["binomial", "chain", "star"])
def test_eight_processes_replicate(cluster_factory, route: str) -> None:  # type: ignore[no-untyped-def]
    c, manifest = cluster_factory(8, 2 << 20, route, stall_timeout=5.0)
    c.go()
    done = c.wait_done(timeout=120)
    for i, ev in done.items():
        assert ev["event"] == "done", (i, ev, c.log(i))
        assert digest(Path(ev["path"])) == manifest.sha256


def test_kill_9_relay_mid_transfer_survivors_finish(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    """Binomial over 8 processes, uploads capped so the transfer takes seconds; node 1 (the relay
    for 3, 5 and, through 3, 7) is killed while it is still receiving."""
    size = 8 << 20
    rate = 4 << 20  # bytes/s per node upload
    extra = {i: {"rate_limit": rate} for i in range(8)}
    c, manifest = cluster_factory(8, size, "binomial", stall_timeout=3.0, extra=extra)
    c.go()
    c.nodes[1].wait_for(lambda e: e.get("event") == "progress" and e["done"] >= size // 4, 60)
    assert c.nodes[1].event("done") is None, "relay finished before it could be killed"
    c.kill(1)
    survivors = [0, 2, 3, 4, 5, 6, 7]
    done = c.wait_done(survivors, timeout=120)
    for i, ev in done.items():
        assert ev["event"] == "done", (i, ev, c.log(i))
        assert digest(Path(ev["path"])) == manifest.sha256
    # the relay's targets went elsewhere
    assert done[3]["sources"][0] == 1 and done[3]["sources"][-1] != 1
    assert done[5]["sources"][-1] != 1


async def test_client_stuck_mid_request_is_dropped(tmp_path: Path) -> None:
    src = tmp_path / "data.bin"
    manifest = make_file(src, 2 * CHUNK)
    token = secrets.token_hex(16)
    store = ChunkStore.complete(src, manifest)
    tls = tls_for(2)
    server = DataServer(token, manifest, store, host="127.0.0.1", group_size=2, stall_timeout=0.2, tls=tls[0])
    try:
        port = await server.start()
        reader, writer, _ = await auth.connect("127.0.0.1", port, token, "data", {"index": 1}, timeout=2,
                                               ssl=tls[1].client(0))
        writer.write(wire.encode(data.HaveRequest().to_frame())[:6])  # half a frame, then nothing
        await writer.drain()
        with pytest.raises(wire.ConnectionClosed):
            await wire.read_frame(reader, timeout=5)
        await wire.close_writer(writer)
    finally:
        await server.close()
        store.close()

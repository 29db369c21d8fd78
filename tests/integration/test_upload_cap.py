"""[replication] max_upload_mbit: a data server given the configured cap serves no faster
(real TLS connections on loopback, two members fetching from one source at once)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from pathlib import Path

import pytest

from crowdd.data.cache import DatasetCache
from crowdd.config import ReplicationConfig
from crowdd.data.manifest import Manifest
from crowdd.replication.replicator import Peer, Replicator
from crowdd.replication.server import DataServer
from crowdd.replication.store import ChunkStore
from crowdd.testing.identities import identity
from crowdd.testing.replication_node import group_tls

pytestmark = pytest.mark.timeout(120)
CHUNK = 256 << 10


async def _replicate(tmp_path: Path, size: int, cfg: ReplicationConfig) -> float:
    tmp_path.mkdir()
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(size))
    manifest = Manifest.build(src, chunk_size=CHUNK, name="t")
    tls = group_tls([identity(f"cap{i}") for i in range(3)])
    token = secrets.token_hex(16)
    store = ChunkStore.complete(src, manifest)
    # the source serves both others itself (route "star"), under the configured cap
    server = DataServer(token, manifest, store, host="127.0.0.1", targets=[1, 2], group_size=3, stall_timeout=5.0,
                        late_bound=0.5, tls=tls[0], rate_limit=cfg.upload_rate())
    port = await server.start()
    peers = [Peer(0, "127.0.0.1", port), Peer(1, "127.0.0.1", 1), Peer(2, "127.0.0.1", 1)]
    try:
        reps = [Replicator(i, peers, token, manifest, DatasetCache(tmp_path / f"c{i}"), route="star",
                           stall_timeout=5.0, tls=tls[i]) for i in (1, 2)]
        t0 = time.monotonic()
        paths = await asyncio.wait_for(asyncio.gather(*(r.run() for r in reps)), 60)
        elapsed = time.monotonic() - t0
    finally:
        await server.close()
        store.close()
    for p in paths:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == manifest.sha256
    return elapsed


async def test_the_configured_upload_cap_holds(tmp_path: Path) -> None:
    size = 2 << 20  # served twice: 4 MiB out of the source
    cfg = ReplicationConfig(max_upload_mbit=16.0)  # 2 MB/s for all connections together
    assert cfg.upload_rate() == 2_000_000
    elapsed = await _replicate(tmp_path / "capped", size, cfg)
    floor = (2 * size - CHUNK) / 2_000_000  # the first chunk may go at once
    assert elapsed >= floor * 0.95, (elapsed, floor)
    uncapped = await _replicate(tmp_path / "free", size, ReplicationConfig())
    assert uncapped < elapsed / 2, (uncapped, elapsed)

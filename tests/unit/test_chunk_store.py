"""ChunkStore: verified writes in place, resume from a partial file, install into the cache."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from crowdd.data.cache import DatasetCache
from crowdd.data.manifest import Manifest
from crowdd.replication.errors import ReplicationError
from crowdd.replication.store import ChunkStore

CHUNK = 4096


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(3 * CHUNK + 100))  # the last chunk is short
    return path


@pytest.fixture
def manifest(src: Path) -> Manifest:
    return Manifest.build(src, chunk_size=CHUNK, name="t")


@pytest.fixture
def cache(tmp_path: Path) -> DatasetCache:
    return DatasetCache(tmp_path / "cache")


@pytest.fixture
def store(cache: DatasetCache, manifest: Manifest) -> Iterator[ChunkStore]:
    s = ChunkStore.open(cache, manifest)
    try:
        yield s
    finally:
        s.close()


def chunk(src: Path, manifest: Manifest, k: int) -> bytes:
    off, length = manifest.chunk_span(k)
    return src.read_bytes()[off : off + length]


def test_a_fresh_store_holds_nothing(store: ChunkStore, manifest: Manifest, cache: DatasetCache) -> None:
    assert store.count == 0 and store.done_bytes == 0 and not store.complete_now
    assert store.missing() == [0, 1, 2, 3]
    assert store.held() == (False,) * 4
    assert store.path == cache.partial_path(manifest)
    with pytest.raises(KeyError):
        store.read(0)


def test_only_chunks_that_match_the_manifest_are_written(store: ChunkStore, src: Path, manifest: Manifest) -> None:
    assert not store.write(1, b"x" * CHUNK)  # wrong bytes
    assert not store.write(3, chunk(src, manifest, 3) + b"x")  # wrong length
    assert store.count == 0
    assert store.write(3, chunk(src, manifest, 3))
    assert store.write(3, b"ignored: already held")
    assert store.count == 1 and store.done_bytes == 100
    assert store.held() == (False, False, False, True)
    assert store.read(3) == chunk(src, manifest, 3)


def test_finish_installs_the_file_into_the_cache(
    store: ChunkStore, src: Path, manifest: Manifest, cache: DatasetCache
) -> None:
    with pytest.raises(ReplicationError, match="missing"):
        store.finish(cache)
    for k in range(manifest.num_chunks):
        assert store.write(k, memoryview(chunk(src, manifest, k)))
    assert store.complete_now and store.done_bytes == manifest.size
    path = store.finish(cache)
    assert path == cache.data_path(manifest) == store.path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest.sha256
    assert cache.has(manifest) == path
    assert store.read(0) == chunk(src, manifest, 0)  # the open file followed the rename


def test_a_partial_file_is_resumed_chunk_by_chunk(src: Path, manifest: Manifest, cache: DatasetCache) -> None:
    first = ChunkStore.open(cache, manifest)
    try:
        assert first.write(0, chunk(src, manifest, 0)) and first.write(2, chunk(src, manifest, 2))
    finally:
        first.close()
    again = ChunkStore.open(cache, manifest)
    try:
        assert again.missing() == [1, 3]
        assert again.done_bytes == 2 * CHUNK
    finally:
        again.close()


def test_a_cached_file_opens_complete(src: Path, manifest: Manifest, cache: DatasetCache) -> None:
    cache.add_file(src, manifest)
    store = ChunkStore.open(cache, manifest)
    try:
        assert store.complete_now and store.missing() == []
        assert store.path == cache.data_path(manifest)
        assert store.finish(cache) == cache.data_path(manifest)
    finally:
        store.close()


def test_a_trusted_file_is_copied_into_the_cache(src: Path, manifest: Manifest, cache: DatasetCache) -> None:
    store = ChunkStore.complete(src, manifest)
    try:
        assert store.complete_now and store.read(1) == chunk(src, manifest, 1)
        path = store.finish(cache)
        assert path == cache.data_path(manifest) and src.exists()
    finally:
        store.close()
    store.close()  # closing twice is harmless


async def test_a_waiter_wakes_when_a_chunk_arrives(store: ChunkStore, src: Path, manifest: Manifest) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await store.wait_change(0.05)  # nothing arrives: times out quietly
    assert loop.time() - t0 >= 0.04
    waiter = asyncio.create_task(store.wait_change(5.0))
    await asyncio.sleep(0)
    store.write(2, chunk(src, manifest, 2))
    await asyncio.wait_for(waiter, 1.0)

"""The dataset file being filled chunk by chunk, shared by the fetcher and the data server."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path

from crowdd.data.cache import DatasetCache
from crowdd.data.manifest import Manifest
from crowdd.replication.errors import ReplicationError

logger = logging.getLogger(__name__)

class ChunkStore:
    """One dataset file being filled chunk by chunk, shared by the fetcher and the server.

    Chunks are written in place with ``pwrite`` only after they match the manifest. The
    manifest is trusted (its digest came from the matchmaker), so a file whose every chunk
    matches it is the file; it is not hashed a second time as a whole (that would cost a
    third of a relay's CPU). The cache records which manifest a file was checked against
    and re-hashes it whole before trusting it for any other manifest.
    """

    def __init__(self, manifest: Manifest, path: Path, fd: int, have: bytearray) -> None:
        self.manifest = manifest
        self.path = path
        self._fd = fd
        self.file = open(fd, "rb", buffering=0, closefd=False)  # noqa: SIM115 - for sendfile; closed in close()
        self._have = have
        self._count = sum(have)
        self._bytes = sum(manifest.chunk_span(i)[1] for i in range(manifest.num_chunks) if have[i])
        self._trusted = False
        self._changed = asyncio.Event()
        self._closed = False

    # -- constructors

    @classmethod
    def complete(cls, path: Path, manifest: Manifest) -> ChunkStore:
        """A store over a file we already trust (the host's canonical file, a cache hit)."""
        fd = os.open(path, os.O_RDONLY)
        store = cls(manifest, Path(path), fd, bytearray(b"\x01" * manifest.num_chunks))
        store._trusted = True
        return store

    @classmethod
    def open(cls, cache: DatasetCache, manifest: Manifest) -> ChunkStore:
        """The cached file if present and verified; else the partial download (resumed)."""
        done = cache.has(manifest)
        if done is not None:
            return cls.complete(done, manifest)
        cache.ensure()
        path = cache.partial_path(manifest)
        fresh = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, manifest.size)
            have = bytearray(manifest.num_chunks)
            for i in range(0 if fresh else manifest.num_chunks):
                off, length = manifest.chunk_span(i)
                data = os.pread(fd, length, off)
                if manifest.chunk_ok(i, data):
                    have[i] = 1
        except OSError:
            os.close(fd)
            raise
        store = cls(manifest, path, fd, have)
        if store._count:
            logger.info("resuming %s: %d of %d chunks already held", path.name, store._count, manifest.num_chunks)
        return store

    # -- queries

    def has(self, index: int) -> bool:
        return bool(self._have[index])

    @property
    def count(self) -> int:
        return self._count

    @property
    def complete_now(self) -> bool:
        return self._count == self.manifest.num_chunks

    @property
    def done_bytes(self) -> int:
        return self._bytes

    def missing(self) -> list[int]:
        return [i for i in range(self.manifest.num_chunks) if not self._have[i]]

    def held(self) -> tuple[bool, ...]:
        """``held()[k]``: whether chunk k is here (verified)."""
        return tuple(bool(h) for h in self._have)

    # -- data

    def read(self, index: int) -> bytes:
        if not self._have[index]:
            raise KeyError(index)
        off, length = self.manifest.chunk_span(index)
        return os.pread(self._fd, length, off)

    def write(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """Store a chunk if it matches the manifest; False (nothing written) if not."""
        if self._have[index]:
            return True
        _, length = self.manifest.chunk_span(index)
        if len(data) != length or hashlib.sha256(data).hexdigest() != self.manifest.chunks[index]:
            return False
        off, _ = self.manifest.chunk_span(index)
        os.pwrite(self._fd, data, off)
        self._have[index] = 1
        self._count += 1
        self._bytes += len(data)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    async def wait_change(self, timeout: float) -> None:
        """Wait until any chunk arrives (or ``timeout`` passes)."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def finish(self, cache: DatasetCache) -> Path:
        """Install the finished download into the cache (atomic rename); returns its path."""
        if not self.complete_now:
            raise ReplicationError("cannot finish: chunks are missing")
        if self.path == cache.data_path(self.manifest):
            return self.path
        if self._trusted:  # a file we were handed: copy it in (add_file verifies it)
            return cache.add_file(self.path, self.manifest)
        dest = cache.install(self.path, self.manifest, verified=True)
        self.path = dest  # the open fd follows the inode
        return dest

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.file.close()
            os.close(self._fd)


__all__ = ["ChunkStore"]

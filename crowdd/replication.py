"""Stage 2: the dataset travels peer to peer along the precomputed route.

Every node runs a :class:`DataServer` on its advertised data port and a
:class:`Replicator` that fetches from its source in :func:`crowdd.route.node_plan`.
Both share one :class:`ChunkStore`, so a chunk verified on arrival can be served
onwards at once (cut-through).

Data-channel protocol (after :mod:`crowdd.auth` with purpose ``"data"``; the client's
hello carries ``{"index": i}``)::

    {"type": "have"}                   → {"type": "have", "count", "complete", "bitmap": hex}
    {"type": "manifest"}               → {"type": "manifest", "blob": n} + canonical JSON
    {"type": "get", "chunks": [...], "wait": bool}
        → per chunk {"type": "chunk", "index": k, "blob": len} + bytes
          ({"type": "missing", "index": k} when not held and not waiting),
          {"type": "queued"} / {"type": "wait"} keepalives while waiting for the turn or
          for a chunk, then {"type": "end"}.

A source serves its plan targets one at a time in plan order (so the binomial schedule
holds); a target that has not connected within ``late_bound`` seconds of its turn is
skipped and served later. Other clients (nodes recovering from a dead source) are served
at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdd import auth, wire
from crowdd.cache import DatasetCache
from crowdd.manifest import Manifest
from crowdd.route import node_plan
from crowdd.aio import spawn_tracked

logger = logging.getLogger(__name__)

PURPOSE = "data"
STREAM_LIMIT = 4 << 20


class ReplicationError(Exception):
    """The transfer cannot complete (no holder of the data is reachable)."""


@dataclass(frozen=True)
class Peer:
    index: int
    host: str
    port: int


@dataclass(frozen=True)
class Progress:
    done_bytes: int
    total_bytes: int
    source: int | None


ProgressCallback = Callable[[Progress], None]


# --------------------------------------------------------------------------- chunk store


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

    def bitmap_hex(self) -> str:
        bits = 0
        for i, h in enumerate(self._have):
            if h:
                bits |= 1 << i
        nbytes = (self.manifest.num_chunks + 7) // 8
        return bits.to_bytes(nbytes, "little").hex()

    @staticmethod
    def parse_bitmap(value: str, num_chunks: int) -> list[bool]:
        raw = int.from_bytes(bytes.fromhex(value), "little") if value else 0
        return [bool(raw >> i & 1) for i in range(num_chunks)]

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


# --------------------------------------------------------------------------- turn order


class _Turns:
    """Serve plan targets one at a time, in plan order; skip one that is late."""

    def __init__(self, order: Sequence[int], late_bound: float) -> None:
        self.order = list(order)
        self.late_bound = late_bound
        self.done: set[int] = set()
        self.skipped: set[int] = set()
        self.waiting: dict[int, float] = {}
        self.active: int | None = None
        self.free_since = time.monotonic()
        self._cond = asyncio.Condition()

    def planned(self, index: int) -> bool:
        return index in self.order and index not in self.done

    def _pick(self) -> int | None:
        if self.active is not None:
            return None
        for t in self.order:
            if t in self.done or t in self.skipped:
                continue
            if t in self.waiting:
                return t
            if time.monotonic() - self.free_since < self.late_bound:
                return None
            logger.info("target %d is late; serving the next one", t)
            self.skipped.add(t)
        ready = [t for t in self.order if t in self.waiting]
        return ready[0] if ready else None

    async def acquire(self, index: int, keepalive: float) -> bool:
        """True when it is ``index``'s turn; False after ``keepalive`` s (send one, retry)."""
        async with self._cond:
            self.waiting.setdefault(index, time.monotonic())
            deadline = time.monotonic() + keepalive
            while True:
                if self._pick() == index:
                    self.active = index
                    self.waiting.pop(index, None)
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    await asyncio.wait_for(self._cond.wait(), min(left, 0.25))
                except asyncio.TimeoutError:
                    pass

    async def leave(self, index: int) -> None:
        """A queued target went away: it no longer holds up the others."""
        async with self._cond:
            self.waiting.pop(index, None)
            if index not in self.done:
                self.skipped.add(index)
            self._cond.notify_all()

    async def release(self, index: int, completed: bool) -> None:
        async with self._cond:
            if self.active == index:
                self.active = None
                self.free_since = time.monotonic()
            (self.done if completed else self.skipped).add(index)
            self._cond.notify_all()


# --------------------------------------------------------------------------- server


class DataServer:
    """Serves the chunks this node holds to authenticated members of the group."""

    def __init__(
        self,
        token: str,
        manifest: Manifest,
        store: ChunkStore,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        targets: Sequence[int] = (),
        group_size: int | None = None,
        stall_timeout: float = 10.0,
        late_bound: float | None = None,
        keepalive: float | None = None,
        sock: socket.socket | None = None,
        rate_limit: float | None = None,
    ) -> None:
        auth._key(token)
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError("rate_limit must be positive (bytes per second) or None")
        self.rate_limit = rate_limit
        self._next_send = 0.0
        self.token = token
        self.manifest = manifest
        self.store = store
        self.host = host
        self.port = port
        self.group_size = group_size
        self.stall_timeout = stall_timeout
        self.keepalive = keepalive if keepalive is not None else max(0.05, stall_timeout / 4)
        self.turns = _Turns(targets, late_bound if late_bound is not None else stall_timeout)
        self.idle_timeout = 6 * stall_timeout  # a client silent (or stuck mid-request) this long is dropped
        self._sock = sock
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.served_chunks = 0

    async def start(self) -> int:
        """Bind and listen; returns the bound port."""
        if self._sock is not None:
            self._server = await asyncio.start_server(self._on_client, sock=self._sock, limit=STREAM_LIMIT)
        else:
            self._server = await asyncio.start_server(
                self._on_client, self.host, self.port, limit=STREAM_LIMIT, reuse_address=True
            )
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("data server listening on %s:%d", self.host, self.port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass
            self._server = None

    async def __aenter__(self) -> DataServer:  # noqa: PYI034 - 3.10 has no typing.Self
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        spawn_tracked(self._tasks, self._serve(reader, writer))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await auth.accept(reader, writer, self.token, PURPOSE, timeout=self.stall_timeout)
        except auth.AuthError:
            return
        try:
            index = hello.get("index")
            if not isinstance(index, int) or isinstance(index, bool) or index < 0 or (
                self.group_size is not None and index >= self.group_size
            ):
                raise wire.WireError(wire.ErrorCode.BAD_FIELD, "hello.index must be a node index", field="index")
            while True:
                try:
                    req = await wire.read_frame(reader, timeout=self.idle_timeout)
                except (wire.ConnectionClosed, wire.FrameTimeout):
                    return
                await self._handle(index, req, writer)
        except wire.WireError as exc:
            await wire.send_error_and_close(writer, exc)
            return
        except (wire.ConnectionClosed, wire.FrameTimeout, OSError) as exc:
            logger.info("dropped data client: %s", exc)
        finally:
            await wire.close_writer(writer)

    async def _handle(self, index: int, req: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        kind = req.get("type")
        timeout = self.stall_timeout
        if kind == "have":
            await wire.write_frame(
                writer,
                {"type": "have", "count": self.store.count, "complete": self.store.complete_now,
                 "bitmap": self.store.bitmap_hex()},
                timeout=timeout,
            )
        elif kind == "manifest":
            await wire.write_frame(writer, {"type": "manifest"}, self.manifest.to_json(), timeout=timeout)
        elif kind == "get":
            chunks = wire.require(req, "chunks", list)
            n = self.manifest.num_chunks
            if any(not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < n for c in chunks):
                raise wire.WireError(wire.ErrorCode.BAD_FIELD, f"chunks must be indices in 0..{n - 1}", field="chunks")
            await self._stream(index, chunks, bool(req.get("wait", True)), writer)
        else:
            raise wire.WireError(wire.ErrorCode.UNKNOWN_TYPE, f"unknown request {kind!r}")

    async def _send_chunk(self, writer: asyncio.StreamWriter, k: int) -> None:
        """One chunk frame; the bytes go file → socket with sendfile where the OS allows."""
        off, length = self.manifest.chunk_span(k)
        if self.rate_limit is not None:  # one shared budget for the whole upload
            now = time.monotonic()
            start = max(now, self._next_send)
            self._next_send = start + length / self.rate_limit
            if start > now:
                await asyncio.sleep(start - now)
        wire.write_frame_nowait(writer, {"type": "chunk", "index": k, "blob": length})
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sendfile(writer.transport, self.store.file, off, length),
                                   self.stall_timeout)
        except asyncio.TimeoutError:
            raise wire.FrameTimeout(f"peer did not read for {self.stall_timeout} s") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise wire.ConnectionClosed(str(exc)) from None

    async def _stream(self, index: int, chunks: list[int], wait: bool, writer: asyncio.StreamWriter) -> None:
        planned = self.turns.planned(index)
        if planned and not chunks:  # the target has the file already
            await self.turns.release(index, True)
            await wire.write_frame(writer, {"type": "end"}, timeout=self.stall_timeout)
            return
        if planned:
            try:
                while not await self.turns.acquire(index, self.keepalive):
                    await wire.write_frame(writer, {"type": "queued"}, timeout=self.stall_timeout)
            except BaseException:
                await self.turns.leave(index)
                raise
        completed = False
        try:
            for k in chunks:
                while not self.store.has(k):
                    if not wait:
                        break
                    await self.store.wait_change(self.keepalive)
                    if not self.store.has(k):
                        await wire.write_frame(writer, {"type": "wait"}, timeout=self.stall_timeout)
                if not self.store.has(k):
                    await wire.write_frame(writer, {"type": "missing", "index": k}, timeout=self.stall_timeout)
                    continue
                await self._send_chunk(writer, k)
                self.served_chunks += 1
            await wire.write_frame(writer, {"type": "end"}, timeout=self.stall_timeout)
            completed = True
        finally:
            if planned:
                await self.turns.release(index, completed)


# --------------------------------------------------------------------------- client


class _DataStream(asyncio.BufferedProtocol):
    """The client side of a get stream: frames are parsed as they come and each blob is
    received straight into one reused buffer and handed to ``on_frame`` synchronously."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_blob: int,
        on_frame: Callable[[dict[str, Any], memoryview | None], bool],
    ) -> None:
        self._loop = loop
        self._max_blob = max_blob
        self._on_frame = on_frame
        self._scratch = bytearray(64 << 10)
        self._pending = bytearray()
        self._blob = bytearray(max_blob)
        self._blob_frame: dict[str, Any] | None = None
        self._blob_len = 0
        self._blob_got = 0
        self.finished: asyncio.Future[None] = loop.create_future()
        self.last_rx = loop.time()
        self.transport: asyncio.BaseTransport | None = None

    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        if self._blob_frame is not None:
            return memoryview(self._blob)[self._blob_got : self._blob_len]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        self.last_rx = self._loop.time()
        if self.finished.done():
            return
        try:
            if self._blob_frame is not None:
                self._blob_got += nbytes
                if self._blob_got == self._blob_len:
                    self._deliver_blob()
            else:
                self._pending += memoryview(self._scratch)[:nbytes]
            self._parse()
        except Exception as exc:  # noqa: BLE001 - any failure ends this stream, not the node
            self._fail(exc)

    def _parse(self) -> None:
        while self._blob_frame is None and not self.finished.done():
            if len(self._pending) < wire.HEADER_SIZE:
                return
            (length,) = struct.unpack_from(">I", self._pending)
            wire.check_length(length)
            end = wire.HEADER_SIZE + length
            if len(self._pending) < end:
                return
            frame = wire.decode_body(bytes(self._pending[wire.HEADER_SIZE : end]))
            del self._pending[:end]
            blob_len = frame.get("blob") or 0
            if not blob_len:
                self._dispatch(frame, None)
                continue
            if blob_len > self._max_blob:
                raise wire.WireError(wire.ErrorCode.TOO_LARGE, f"payload of {blob_len} bytes exceeds {self._max_blob}")
            take = min(blob_len, len(self._pending))
            self._blob[:take] = self._pending[:take]
            del self._pending[:take]
            self._blob_frame, self._blob_len, self._blob_got = frame, blob_len, take
            if take == blob_len:
                self._deliver_blob()

    def _deliver_blob(self) -> None:
        frame, n = self._blob_frame, self._blob_len
        self._blob_frame, self._blob_len, self._blob_got = None, 0, 0
        if frame is not None:
            with memoryview(self._blob) as view, view[:n] as blob:
                self._dispatch(frame, blob)

    def _dispatch(self, frame: dict[str, Any], blob: memoryview | None) -> None:
        if self._on_frame(frame, blob) and not self.finished.done():
            self.finished.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if not self.finished.done():
            self.finished.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            msg = "connection closed" if self._blob_frame is None and not self._pending else "connection closed mid-frame"
            self.finished.set_exception(wire.ConnectionClosed(f"{msg}: {exc}" if exc else msg))


class _SourceFailed(Exception):
    def __init__(self, message: str, *, corrupt: bool = False) -> None:
        super().__init__(message)
        self.corrupt = corrupt


class Replicator:
    """Fetches the dataset for node ``index`` from its route source, with fallback."""

    def __init__(
        self,
        index: int,
        peers: list[Peer],
        token: str,
        manifest: Manifest,
        cache: DatasetCache,
        *,
        route: str = "binomial",
        stall_timeout: float = 10.0,
        on_progress: ProgressCallback | None = None,
        store: ChunkStore | None = None,
        give_up: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        auth._key(token)
        self.index = index
        self.peers = {p.index: p for p in peers}
        if sorted(self.peers) != list(range(len(peers))):
            raise ValueError(f"peers must be numbered 0..{len(peers) - 1} exactly once")
        self.n = len(peers)
        self.plan = node_plan(self.n, index, route)  # RouteError for an index outside the group
        self.token = token
        self.manifest = manifest
        self.cache = cache
        self.stall_timeout = stall_timeout
        self.on_progress = on_progress
        self.store = store
        self.give_up = give_up if give_up is not None else 6 * stall_timeout
        self.rng = rng or random.Random(index)
        self.bad: set[int] = set()  # peers that served corrupt data: never again
        self.failed: set[int] = set()  # peers that died or stalled (retried when no one else is left)
        self.corrupt_chunks = 0
        self.sources_used: list[int] = []

    def _report(self, source: int | None) -> None:
        if self.on_progress is not None and self.store is not None:
            self.on_progress(Progress(self.store.done_bytes, self.manifest.size, source))

    async def run(self) -> Path:
        cached = self.cache.has(self.manifest)
        if cached is not None:
            logger.info("dataset %s already cached; skipping the transfer", self.manifest.sha256[:12])
            if self.on_progress is not None:
                self.on_progress(Progress(self.manifest.size, self.manifest.size, None))
            await self._tell_source_done()
            return cached
        own_store = self.store is None
        if self.store is None:
            self.store = ChunkStore.open(self.cache, self.manifest)
        try:
            return await self._run(self.store)
        finally:
            if own_store:
                self.store.close()

    async def _run(self, store: ChunkStore) -> Path:
        self._report(None)
        last_progress = time.monotonic()
        first = True
        while not store.complete_now:
            if first and self.plan.source is not None:
                source: int | None = self.plan.source
                wait = True
            else:
                source, wait = await self._choose_fallback()
            if source is None:
                if time.monotonic() - last_progress > self.give_up:
                    raise ReplicationError(
                        f"node {self.index}: no holder of the data reachable for {self.give_up:.0f} s"
                    )
                await asyncio.sleep(min(1.0, self.stall_timeout / 4))
                self.failed.clear()
                continue
            before = store.count
            try:
                await self._fetch_from(source, wait, connect_retry=first)
            except _SourceFailed as exc:
                logger.warning("node %d: source %d failed: %s", self.index, source, exc)
                (self.bad if exc.corrupt else self.failed).add(source)
            finally:
                if store.count > before:
                    last_progress = time.monotonic()
            first = False
            if not store.complete_now and store.count == before:
                await asyncio.sleep(0.05)
        path = await asyncio.to_thread(store.finish, self.cache)
        self._report(None)
        logger.info("node %d: dataset complete (%s)", self.index, path)
        return path

    async def _tell_source_done(self) -> None:
        """Best effort: tell our plan source not to wait for us."""
        if self.plan.source is None or self.plan.source not in self.peers:
            return
        peer = self.peers[self.plan.source]
        try:
            reader, writer, _ = await auth.connect(
                peer.host, peer.port, self.token, PURPOSE, {"index": self.index}, timeout=1.0
            )
        except auth.AuthError:
            return
        try:
            await wire.write_frame(writer, {"type": "get", "chunks": [], "wait": False}, timeout=1.0)
            await wire.read_frame(reader, timeout=1.0)
        except (wire.WireError, wire.ConnectionClosed, wire.FrameTimeout, OSError):
            pass
        finally:
            await wire.close_writer(writer)

    async def _connect(self, peer: Peer, *, retry_for: float = 0.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        deadline = time.monotonic() + retry_for
        delay = 0.05
        while True:
            try:
                reader, writer, _ = await auth.connect(
                    peer.host, peer.port, self.token, PURPOSE, {"index": self.index},
                    timeout=self.stall_timeout, limit=STREAM_LIMIT,
                )
                return reader, writer
            except auth.AuthError as exc:
                if exc.code != "connection" or time.monotonic() + delay > deadline:
                    raise _SourceFailed(str(exc)) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _fetch_from(self, source: int, wait: bool, *, connect_retry: bool) -> None:
        store = self.store
        if store is None:  # pragma: no cover - run() sets it
            raise ReplicationError("no store")
        peer = self.peers.get(source)
        if peer is None:
            raise _SourceFailed(f"unknown peer {source}")
        reader, writer = await self._connect(peer, retry_for=self.stall_timeout if connect_retry else 0.0)
        if source not in self.sources_used:
            self.sources_used.append(source)
        loop = asyncio.get_running_loop()
        transport = writer.transport
        if getattr(reader, "_buffer", b""):  # the server spoke out of turn after the welcome
            transport.abort()
            raise _SourceFailed("unexpected data after the handshake")
        # From here on the bulk data lands straight in a reused buffer (no StreamReader copies).
        stream = _DataStream(loop, self.manifest.chunk_size, lambda f, b: self._on_frame(source, f, b))
        transport.set_protocol(stream)
        stream.transport = transport
        try:
            wanted = store.missing()
            transport.write(wire.encode({"type": "get", "chunks": wanted, "wait": wait}))
            self._report(source)
            while not stream.finished.done():
                await asyncio.wait([stream.finished], timeout=min(1.0, self.stall_timeout))
                if not stream.finished.done() and loop.time() - stream.last_rx > self.stall_timeout:
                    raise _SourceFailed(f"stalled for {self.stall_timeout} s")
            stream.finished.result()
        except (wire.WireError, wire.RemoteError) as exc:
            raise _SourceFailed(f"protocol error: {exc}") from None
        except (wire.ConnectionClosed, OSError) as exc:
            raise _SourceFailed(f"connection lost: {exc}") from None
        finally:
            if not stream.finished.done():
                stream.finished.cancel()
            transport.abort()

    def _on_frame(self, source: int, frame: dict[str, Any], blob: memoryview | None) -> bool:
        """Handle one frame of a get stream; True at its end. Raises _SourceFailed."""
        store = self.store
        if store is None:  # pragma: no cover
            raise ReplicationError("no store")
        wire.raise_if_error(frame)
        kind = frame.get("type")
        if kind == "chunk":
            k = frame.get("index")
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < self.manifest.num_chunks or blob is None:
                raise _SourceFailed("chunk frame without a valid index", corrupt=True)
            if not store.write(k, blob):
                self.corrupt_chunks += 1
                raise _SourceFailed(f"chunk {k} does not match the manifest", corrupt=True)
            self._report(source)
            return False
        if kind == "end":
            return True
        if kind in ("queued", "wait", "missing"):
            return False
        raise _SourceFailed(f"unexpected frame {kind!r}")

    async def _query_have(self, peer: Peer) -> tuple[int, bool, list[bool]] | None:
        try:
            reader, writer, _ = await auth.connect(
                peer.host, peer.port, self.token, PURPOSE, {"index": self.index},
                timeout=min(self.stall_timeout, 3.0),
            )
        except auth.AuthError:
            return None
        try:
            await wire.write_frame(writer, {"type": "have"}, timeout=self.stall_timeout)
            frame = await wire.read_frame(reader, timeout=self.stall_timeout)
            if frame.get("type") != "have" or not isinstance(frame.get("bitmap"), str):
                return None
            bits = ChunkStore.parse_bitmap(frame["bitmap"], self.manifest.num_chunks)
            return peer.index, bool(frame.get("complete")), bits
        except (wire.WireError, wire.ConnectionClosed, wire.FrameTimeout, OSError, ValueError):
            return None
        finally:
            await wire.close_writer(writer)

    async def _choose_fallback(self) -> tuple[int | None, bool]:
        """A complete holder (random, to spread load), else the partial one with most we lack."""
        store = self.store
        if store is None:  # pragma: no cover
            return None, False
        skip = self.bad | self.failed | {self.index}
        candidates = [p for i, p in self.peers.items() if i not in skip]
        answers = await asyncio.gather(*(self._query_have(p) for p in candidates))
        complete: list[int] = []
        partial: list[tuple[int, int]] = []
        for ans in answers:
            if ans is None:
                continue
            idx, is_complete, bits = ans
            if is_complete:
                complete.append(idx)
            else:
                useful = sum(1 for k, b in enumerate(bits) if b and not store.has(k))
                if useful:
                    partial.append((useful, idx))
        if complete:
            choice = self.rng.choice(sorted(complete))
            logger.info("node %d: fetching the rest from complete holder %d", self.index, choice)
            return choice, True
        if partial:
            partial.sort(reverse=True)
            return partial[0][1], False
        return None, False


async def fetch_manifest(peer: Peer, token: str, index: int, digest: str, *, timeout: float = 10.0) -> Manifest:
    """Get the manifest from a peer and check it against the matchmaker's digest."""
    reader, writer, _ = await auth.connect(peer.host, peer.port, token, PURPOSE, {"index": index}, timeout=timeout)
    try:
        await wire.write_frame(writer, {"type": "manifest"}, timeout=timeout)
        frame, blob = await wire.read_message(reader, timeout=timeout)
        wire.raise_if_error(frame)
        return Manifest.from_json(blob, expect_digest=digest)
    finally:
        await wire.close_writer(writer)


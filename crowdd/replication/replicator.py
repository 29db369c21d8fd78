"""The fetcher: node ``index`` gets the dataset from its route source, with fallback.

The source comes from :func:`crowdd.route.node_plan`. If it dies, stalls or refuses us, the
node asks every other peer what it holds and fetches only the chunks it still lacks from a
complete holder (random, to spread the load), or else from the partial holder with most of
what it lacks. A peer that served a chunk that does not match the manifest is never asked
again. :func:`fetch_manifest` gets the manifest itself from a peer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdd import wire
from crowdd.trust import auth
from crowdd.data.cache import DatasetCache
from crowdd.trust.group_tls import GroupTLS
from crowdd.data.manifest import Manifest
from crowdd.protocol import data
from crowdd.replication.errors import ReplicationError
from crowdd.replication.store import ChunkStore
from crowdd.replication.stream import DataStream
from crowdd.route import Plan, node_plan

logger = logging.getLogger(__name__)


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


class _SourceFailed(Exception):
    def __init__(self, message: str, *, corrupt: bool = False) -> None:
        super().__init__(message)
        self.corrupt = corrupt


class Replicator:
    """Fetches the dataset for node ``index`` from its route source, with fallback.

    ``tls``: this node's TLS for the group; every peer is dialled pinned to its own
    certificate (``tls.client(peer.index)``) before the token proof."""

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
        tls: GroupTLS,
        reachable: Sequence[bool] | None = None,
        joining: bool = False,
    ) -> None:
        auth._key(token)
        self.tls = tls
        self.index = index
        self.peers = {p.index: p for p in peers}
        if sorted(self.peers) != list(range(len(peers))):
            raise ValueError(f"peers must be numbered 0..{len(peers) - 1} exactly once")
        self.n = len(peers)
        self.plan = node_plan(self.n, index, route, reachable)  # RouteError for an index outside the group
        # a newcomer to a running session: only the host knows it (the others pinned the
        # group as it was formed), and every other member holds the data already
        self.joining = joining
        if joining:
            self.plan = Plan(source=0, targets=())
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

    def _ssl(self, peer: Peer) -> ssl.SSLContext:
        """TLS pinned to the member we dial: anyone else is refused before a frame is sent."""
        return self.tls.client(peer.index)

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
                peer.host, peer.port, self.token, data.PURPOSE, data.make_hello(self.index), timeout=1.0,
                ssl=self._ssl(peer),
            )
        except auth.AuthError:
            return
        try:
            await wire.write_frame(writer, data.GetRequest((), wait=False).to_frame(), timeout=1.0)
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
                    peer.host, peer.port, self.token, data.PURPOSE, data.make_hello(self.index),
                    ssl=self._ssl(peer), timeout=self.stall_timeout, limit=data.STREAM_LIMIT,
                )
                return reader, writer
            except auth.AuthError as exc:
                if not exc.unreachable or time.monotonic() + delay > deadline:
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
        stream = DataStream(loop, self.manifest.chunk_size, lambda f, b: self._on_frame(source, f, b))
        transport.set_protocol(stream)
        stream.transport = transport
        try:
            wanted = store.missing()
            transport.write(wire.encode(data.GetRequest(tuple(wanted), wait).to_frame()))
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
        try:
            msg = data.check_stream_frame(frame, None if blob is None else len(blob), self.manifest.num_chunks)
        except data.BadChunk as exc:
            raise _SourceFailed(f"bad chunk frame: {exc}", corrupt=True) from None
        except (wire.WireError, wire.RemoteError) as exc:
            raise _SourceFailed(f"protocol error: {exc}") from None
        if isinstance(msg, data.Chunk) and blob is not None:
            if not store.write(msg.index, blob):
                self.corrupt_chunks += 1
                raise _SourceFailed(f"chunk {msg.index} does not match the manifest", corrupt=True)
            self._report(source)
            return False
        return isinstance(msg, data.End)

    async def _query_have(self, peer: Peer) -> tuple[int, bool, tuple[bool, ...]] | None:
        try:
            reader, writer, _ = await auth.connect(
                peer.host, peer.port, self.token, data.PURPOSE, data.make_hello(self.index),
                ssl=self._ssl(peer), timeout=min(self.stall_timeout, 3.0),
            )
        except auth.AuthError:
            return None
        try:
            await wire.write_frame(writer, data.HaveRequest().to_frame(), timeout=self.stall_timeout)
            frame = await wire.read_frame(reader, timeout=self.stall_timeout)
            have = data.check_have_reply(frame, self.manifest.num_chunks)
            return peer.index, have.complete, have.held
        except (wire.WireError, wire.RemoteError, wire.ConnectionClosed, wire.FrameTimeout, OSError):
            return None
        finally:
            await wire.close_writer(writer)

    async def _choose_fallback(self) -> tuple[int | None, bool]:
        """A complete holder (random, to spread load), else the partial one with most we lack."""
        store = self.store
        if store is None:  # pragma: no cover
            return None, False
        skip = self.bad | self.failed | {self.index}
        candidates = [p for i, p in self.peers.items() if i not in skip and (i == 0 or not self.joining)]
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


async def fetch_manifest(
    peer: Peer, token: str, index: int, digest: str, *, timeout: float = 10.0, tls: GroupTLS
) -> Manifest:
    """Get the manifest from a peer (over TLS pinned to it) and check it against the matchmaker's digest."""
    reader, writer, _ = await auth.connect(
        peer.host, peer.port, token, data.PURPOSE, data.make_hello(index), timeout=timeout,
        ssl=tls.client(peer.index),
    )
    try:
        await wire.write_frame(writer, data.ManifestRequest().to_frame(), timeout=timeout)
        frame, blob = await wire.read_message(reader, timeout=timeout)
        return data.check_manifest_reply(frame, blob, digest)
    finally:
        await wire.close_writer(writer)



__all__ = ["Peer", "Progress", "ProgressCallback", "Replicator", "fetch_manifest"]

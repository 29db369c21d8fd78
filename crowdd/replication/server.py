"""The data server: serves the chunks this node holds to authenticated members of the group.

A source serves its plan targets one at a time in plan order (:class:`Turns`, so the
binomial schedule holds); a target that has not connected within ``late_bound`` seconds of
its turn is skipped and served later. Other clients (nodes recovering from a dead source)
are served at once. A chunk the fetcher is still receiving is sent on as soon as it arrives
(the server and the fetcher share one :class:`ChunkStore`).

Every connection is TLS 1.3, mutual and pinned to the group (:class:`crowdd.trust.group_tls.GroupTLS`):
only the other members' certificates get through the handshake, the token proof follows
(:func:`crowdd.trust.auth.accept`), and a client must then present the certificate of the member
index its hello claims, or it is refused with ``unauthorized``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from crowdd import wire
from crowdd.trust import auth
from crowdd.aio import spawn_tracked
from crowdd.trust.group_tls import GroupTLS
from crowdd.data.manifest import Manifest
from crowdd.protocol import data
from crowdd.replication.store import ChunkStore
from crowdd.replication.turns import Turns

logger = logging.getLogger(__name__)

#: Bytes read from the dataset file per write when a chunk goes through TLS.
SPAN_PIECE = 256 << 10


class DataServer:
    """Serves the chunks this node holds to authenticated members of the group.

    ``tls``: this node's TLS for the group; clients are the other members only, and each
    must be the member it says it is."""

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
        tls: GroupTLS,
    ) -> None:
        auth._key(token)
        self.tls = tls
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
        self.turns = Turns(targets, late_bound if late_bound is not None else stall_timeout)
        self.idle_timeout = 6 * stall_timeout  # a client silent (or stuck mid-request) this long is dropped
        self._sock = sock
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.served_chunks = 0

    async def start(self) -> int:
        """Bind and listen; returns the bound port."""
        tls: dict[str, Any] = {"ssl": self.tls.server(), "ssl_handshake_timeout": self.tls.handshake_timeout}
        if self._sock is not None:
            self._server = await asyncio.start_server(self._on_client, sock=self._sock, limit=data.STREAM_LIMIT, **tls)
        else:
            self._server = await asyncio.start_server(
                self._on_client, self.host, self.port, limit=data.STREAM_LIMIT, reuse_address=True, **tls
            )
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("data server listening on %s:%d (TLS, group members only)", self.host, self.port)
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
            hello = await auth.accept(reader, writer, self.token, data.PURPOSE, timeout=self.stall_timeout)
        except auth.AuthError:
            return
        try:
            index = data.check_hello(hello, self.group_size)
            try:
                self.tls.check(writer, index)  # logs the refusal
            except auth.AuthError as exc:
                raise wire.WireError(wire.ErrorCode.UNAUTHORIZED, exc.message) from None
            while True:
                try:
                    req = await wire.read_frame(reader, timeout=self.idle_timeout)
                except (wire.ConnectionClosed, wire.FrameTimeout):
                    return
                await self._handle(index, req, writer)
        except wire.WireError as exc:
            logger.info("refused data client %s: %s", writer.get_extra_info("peername"), exc.message)
            await wire.send_error_and_close(writer, exc)
            return
        except (wire.ConnectionClosed, wire.FrameTimeout, OSError) as exc:
            logger.info("dropped data client: %s", exc)
        finally:
            await wire.close_writer(writer)

    async def _handle(self, index: int, frame: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        req = data.check_request(frame, self.manifest.num_chunks)
        timeout = self.stall_timeout
        if isinstance(req, data.HaveRequest):
            reply = data.HaveReply(self.store.count, self.store.complete_now, self.store.held())
            await wire.write_frame(writer, reply.to_frame(), timeout=timeout)
        elif isinstance(req, data.ManifestRequest):
            answer, blob = data.ManifestReply(self.manifest).to_message()
            await wire.write_frame(writer, answer, blob, timeout=timeout)
        else:
            await self._stream(index, list(req.chunks), req.wait, writer)

    async def _send_chunk(self, writer: asyncio.StreamWriter, k: int) -> None:
        """One chunk frame, its bytes read from the file in pieces (no sendfile through TLS)."""
        off, length = self.manifest.chunk_span(k)
        if self.rate_limit is not None:  # one shared budget for the whole upload
            now = time.monotonic()
            start = max(now, self._next_send)
            self._next_send = start + length / self.rate_limit
            if start > now:
                await asyncio.sleep(start - now)
        wire.write_frame_nowait(writer, data.Chunk(k, length).to_frame())
        try:
            await asyncio.wait_for(self._write_span(writer, off, length), self.stall_timeout)
        except asyncio.TimeoutError:
            raise wire.FrameTimeout(f"peer did not read for {self.stall_timeout} s") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise wire.ConnectionClosed(str(exc)) from None

    async def _write_span(self, writer: asyncio.StreamWriter, off: int, length: int) -> None:
        fd = self.store.file.fileno()
        end = off + length
        while off < end:
            piece = os.pread(fd, min(SPAN_PIECE, end - off), off)
            if not piece:
                raise OSError(f"the dataset file ends before byte {end}")
            writer.write(piece)
            await writer.drain()
            off += len(piece)

    async def _stream(self, index: int, chunks: list[int], wait: bool, writer: asyncio.StreamWriter) -> None:
        planned = self.turns.planned(index)
        if planned and not chunks:  # the target has the file already
            await self.turns.release(index, True)
            await wire.write_frame(writer, data.End().to_frame(), timeout=self.stall_timeout)
            return
        if planned:
            try:
                while not await self.turns.acquire(index, self.keepalive):
                    await wire.write_frame(writer, data.Queued().to_frame(), timeout=self.stall_timeout)
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
                        await wire.write_frame(writer, data.ChunkWait().to_frame(), timeout=self.stall_timeout)
                if not self.store.has(k):
                    await wire.write_frame(writer, data.Missing(k).to_frame(), timeout=self.stall_timeout)
                    continue
                await self._send_chunk(writer, k)
                self.served_chunks += 1
            await wire.write_frame(writer, data.End().to_frame(), timeout=self.stall_timeout)
            completed = True
        finally:
            if planned:
                await self.turns.release(index, completed)


__all__ = ["DataServer"]

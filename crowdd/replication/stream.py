"""The receiving side of a get stream, as an asyncio protocol that copies chunk bytes once.

Frames are parsed as they come; each blob is received straight into one reused buffer and
handed to ``on_frame`` synchronously (the fetcher hashes and writes it before the buffer is
reused), which halved a relay's CPU per MiB compared with a StreamReader.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

from crowdd import wire


class DataStream(asyncio.BufferedProtocol):
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
        self._scratch_view = memoryview(self._scratch)
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
        # A memoryview, never the bytearray itself: asyncio's TLS transport fills a buffer in
        # several reads into ``buf[offset:]``, which for a bytearray is a copy (lost bytes).
        return self._scratch_view

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


__all__ = ["DataStream"]

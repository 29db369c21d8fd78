"""The data protocol's messages (docs/replication.md), used by the data server and the fetcher.

A client proves group membership with :mod:`crowdd.trust.auth` (purpose :data:`PURPOSE`; its hello is
:func:`make_hello`, checked by the server with :func:`check_hello`) and then sends requests, one
at a time::

    HaveRequest      → HaveReply (count, complete, which chunks are held)
    ManifestRequest  → ManifestReply (the canonical manifest JSON as the blob)
    GetRequest       → per chunk Chunk (+ its bytes as the blob) or Missing, Queued / ChunkWait
                       keepalives, then End

The server checks a request with :func:`check_request`; the client checks what comes back with
:func:`check_have_reply`, :func:`check_manifest_reply` and :func:`check_stream_frame`, each of
which turns a peer's ``error`` frame into :class:`crowdd.errors.RemoteError`. Anything malformed
raises :class:`wire.WireError` naming the bad field; a ``chunk`` frame that does not fit the
manifest raises :class:`BadChunk` (the peer is lying or corrupt).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from crowdd import wire
from crowdd.protocol import fields
from crowdd.errors import ErrorCode
from crowdd.data.manifest import Manifest

#: The :mod:`crowdd.trust.auth` purpose of a data connection.
PURPOSE = "data"
#: StreamReader limit on data connections (a manifest blob must fit).
STREAM_LIMIT = 4 << 20


class BadChunk(wire.WireError):
    """A ``chunk`` frame whose index or payload does not fit the manifest."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(ErrorCode.BAD_FIELD, message, field=field)












# --------------------------------------------------------------------------- hello


def make_hello(index: int) -> dict[str, Any]:
    """The client's hello (inside the auth handshake): which node of the group it is."""
    return {"index": index}


def check_hello(hello: Mapping[str, Any], group_size: int | None = None) -> int:
    """The client's node index, in ``0..group_size-1`` when the group size is known."""
    index = hello.get("index")
    if not fields.is_int(index) or index < 0 or (group_size is not None and index >= group_size):
        raise fields.bad("index", "hello.index must be a node index")
    return int(index)


# --------------------------------------------------------------------------- bitmap


def encode_bitmap(held: Sequence[bool]) -> str:
    """Bit k = chunk k, little-endian, as hex (one byte per 8 chunks)."""
    bits = 0
    for i, h in enumerate(held):
        if h:
            bits |= 1 << i
    return bits.to_bytes((len(held) + 7) // 8, "little").hex()


def decode_bitmap(value: Any, num_chunks: int) -> tuple[bool, ...]:
    """The chunks a ``bitmap`` field says are held; it must be exactly as long as the manifest needs."""
    if not isinstance(value, str):
        raise fields.bad("bitmap", f"field 'bitmap' must be a hex string, got {type(value).__name__}")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise fields.bad("bitmap", "field 'bitmap' is not hex") from None
    if len(raw) != (num_chunks + 7) // 8:
        raise fields.bad("bitmap", f"field 'bitmap' must cover {num_chunks} chunks, got {len(raw)} bytes")
    bits = int.from_bytes(raw, "little")
    if bits >> num_chunks:
        raise fields.bad("bitmap", f"field 'bitmap' marks chunks beyond {num_chunks - 1}")
    return tuple(bool(bits >> i & 1) for i in range(num_chunks))


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class HaveRequest:
    """Which chunks do you hold?"""

    def to_frame(self) -> dict[str, Any]:
        return {"type": "have"}


@dataclass(frozen=True)
class ManifestRequest:
    """Send me the manifest."""

    def to_frame(self) -> dict[str, Any]:
        return {"type": "manifest"}


@dataclass(frozen=True)
class GetRequest:
    """Send me these chunks; with ``wait``, wait for the ones you do not hold yet."""

    chunks: tuple[int, ...]
    wait: bool = True

    def to_frame(self) -> dict[str, Any]:
        return {"type": "get", "chunks": list(self.chunks), "wait": self.wait}


Request = Union[HaveRequest, ManifestRequest, GetRequest]


def check_request(frame: Mapping[str, Any], num_chunks: int) -> Request:
    """A client's request; chunk indices must be in ``0..num_chunks-1``."""
    kind = frame.get("type")
    if kind == "have":
        return HaveRequest()
    if kind == "manifest":
        return ManifestRequest()
    if kind == "get":
        chunks = wire.require(frame, "chunks", list)
        if any(not fields.is_int(c) or not 0 <= c < num_chunks for c in chunks):
            raise fields.bad("chunks", f"chunks must be indices in 0..{num_chunks - 1}")
        return GetRequest(tuple(chunks), fields.flag(frame, "wait", True))
    raise wire.WireError(ErrorCode.UNKNOWN_TYPE, f"unknown request {kind!r}")


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True)
class HaveReply:
    """What a node holds: ``held[k]`` for chunk k."""

    count: int
    complete: bool
    held: tuple[bool, ...]

    def to_frame(self) -> dict[str, Any]:
        return {"type": "have", "count": self.count, "complete": self.complete, "bitmap": encode_bitmap(self.held)}


def check_have_reply(frame: Mapping[str, Any], num_chunks: int) -> HaveReply:
    fields.expect(frame, "have")
    return HaveReply(fields.integer(frame, "count"), fields.flag(frame, "complete"), decode_bitmap(frame.get("bitmap"), num_chunks))


@dataclass(frozen=True)
class ManifestReply:
    """The manifest, sent as its canonical JSON in the frame's blob."""

    manifest: Manifest

    def to_message(self) -> tuple[dict[str, Any], bytes]:
        return {"type": "manifest"}, self.manifest.to_json()


def check_manifest_reply(frame: Mapping[str, Any], blob: bytes, expect_digest: str) -> Manifest:
    """The manifest in a reply, checked against the digest the matchmaker gave (``ManifestError``)."""
    fields.expect(frame, "manifest")
    return Manifest.from_json(blob, expect_digest=expect_digest)


# --------------------------------------------------------------------------- the answer to get


@dataclass(frozen=True)
class Chunk:
    """Chunk ``index`` follows as ``length`` bytes of blob."""

    index: int
    length: int

    def to_frame(self) -> dict[str, Any]:
        return {"type": "chunk", "index": self.index, "blob": self.length}


@dataclass(frozen=True)
class Missing:
    """Chunk ``index`` is not held (and the client did not ask to wait)."""

    index: int

    def to_frame(self) -> dict[str, Any]:
        return {"type": "missing", "index": self.index}


@dataclass(frozen=True)
class Queued:
    """Keepalive: the client waits for its turn in the plan order."""

    def to_frame(self) -> dict[str, Any]:
        return {"type": "queued"}


@dataclass(frozen=True)
class ChunkWait:
    """Keepalive: the client waits for a chunk the server has not received yet."""

    def to_frame(self) -> dict[str, Any]:
        return {"type": "wait"}


@dataclass(frozen=True)
class End:
    """The get request is done."""

    def to_frame(self) -> dict[str, Any]:
        return {"type": "end"}


StreamMessage = Union[Chunk, Missing, Queued, ChunkWait, End]


def _chunk_index(value: Any, num_chunks: int) -> int | None:
    return int(value) if fields.is_int(value) and 0 <= value < num_chunks else None


def _index_message(value: Any, num_chunks: int) -> str:
    return f"field 'index' must be a chunk index in 0..{num_chunks - 1}, got {value!r}"


def check_stream_frame(frame: Mapping[str, Any], blob_len: int | None, num_chunks: int) -> StreamMessage:
    """One frame of the answer to a get; ``blob_len`` is the size of the blob that came with it."""
    wire.raise_if_error(frame)
    kind = frame.get("type")
    if kind == "chunk":
        index = _chunk_index(frame.get("index"), num_chunks)
        if index is None:
            raise BadChunk(_index_message(frame.get("index"), num_chunks), field="index")
        if not blob_len:
            raise BadChunk(f"field 'blob' must announce chunk {index}'s bytes", field="blob")
        return Chunk(index, blob_len)
    if kind == "missing":
        index = _chunk_index(frame.get("index"), num_chunks)
        if index is None:
            raise fields.bad("index", _index_message(frame.get("index"), num_chunks))
        return Missing(index)
    if kind == "queued":
        return Queued()
    if kind == "wait":
        return ChunkWait()
    if kind == "end":
        return End()
    raise wire.WireError(ErrorCode.UNKNOWN_TYPE, f"unexpected frame {kind!r}")


__all__ = [
    "PURPOSE",
    "STREAM_LIMIT",
    "BadChunk",
    "Chunk",
    "End",
    "GetRequest",
    "HaveReply",
    "HaveRequest",
    "ManifestReply",
    "ManifestRequest",
    "Missing",
    "Queued",
    "Request",
    "StreamMessage",
    "ChunkWait",
    "check_hello",
    "check_have_reply",
    "check_manifest_reply",
    "check_request",
    "check_stream_frame",
    "decode_bitmap",
    "encode_bitmap",
    "make_hello",
]

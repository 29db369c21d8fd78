"""The one codec for every crowdd connection (matchmaker, peers, control socket).

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON that
decode to an object with a string ``type``. The first frame a client sends on a
connection carries ``"proto": "crowdd/1"``.

A frame may announce a binary payload with an integer ``"blob": N`` field; the N raw
bytes follow the frame on the stream (used for dataset chunks, so bulk data is not
base64-inflated). The codec itself (:func:`encode`, :func:`decode_body`,
:class:`FrameDecoder`) does no I/O; :func:`read_frame` / :func:`write_frame` are thin
asyncio helpers that check the announced size *before* reading a body and put a timeout
on every read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import numbers
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from crowdd.errors import CrowddError, ErrorCode, RemoteError

logger = logging.getLogger(__name__)

PROTO = "crowdd/1"
MAX_FRAME = 1 << 20
MAX_BLOB = 64 << 20
DEFAULT_TIMEOUT = 10.0
_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size


class WireError(CrowddError):
    """A protocol error with a public code and a human message (never a traceback)."""

    def __init__(self, code: ErrorCode, message: str, *, field: str | None = None) -> None:
        super().__init__(message, field=field, code=code)
        self.args = (f"{code.value}: {message}",)


class ConnectionClosed(Exception):
    """The peer closed the connection (cleanly, between frames, or mid-frame)."""


class FrameTimeout(Exception):
    """A read did not complete within its timeout (a silent or stalled peer)."""


def error_frame(code: ErrorCode, message: str, *, field: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code.value, "message": message}
    if field is not None:
        frame["field"] = field
    return frame


def raise_if_error(frame: Mapping[str, Any]) -> None:
    """Turn a received ``error`` frame into :class:`RemoteError`."""
    if frame.get("type") == "error":
        raise RemoteError.from_frame(dict(frame))


# --------------------------------------------------------------------------- codec (no I/O)


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf: a diverged loss) replaced by None.

    Strict JSON has no NaN or infinity; a number that is not one is reported as ``null``
    rather than failing the whole frame (or the status, or the job's event)."""
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral):  # numpy floats too
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Mapping):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON (no NaN/inf tokens); non-finite floats become ``null`` (:func:`finite`)."""
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError:
        return json.dumps(finite(obj), allow_nan=False, **kw)


def encode(msg: Mapping[str, Any], *, max_size: int = MAX_FRAME) -> bytes:
    """Encode one frame (header + JSON body); a NaN or infinity is sent as ``null``."""
    if not isinstance(msg.get("type"), str):
        raise ValueError("a frame needs a string 'type'")
    body = dumps(msg, separators=(",", ":")).encode("utf-8")
    if len(body) > max_size:
        raise WireError(ErrorCode.TOO_LARGE, f"frame of {len(body)} bytes exceeds {max_size}")
    return _HEADER.pack(len(body)) + body


def check_length(length: int, max_size: int = MAX_FRAME) -> None:
    if length > max_size:
        raise WireError(ErrorCode.TOO_LARGE, f"frame of {length} bytes exceeds {max_size}")


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode a frame body; raise :class:`WireError` (bad_frame) on anything malformed."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(ErrorCode.BAD_FRAME, f"frame is not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise WireError(ErrorCode.BAD_FRAME, "frame is not a JSON object")
    if not isinstance(obj.get("type"), str):
        raise WireError(ErrorCode.BAD_FRAME, "frame has no string 'type'")
    blob = obj.get("blob")
    if blob is not None and (not isinstance(blob, int) or isinstance(blob, bool) or blob < 0):
        raise WireError(ErrorCode.BAD_FRAME, "'blob' must be a non-negative integer")
    return obj


def check_proto(frame: Mapping[str, Any]) -> None:
    """Check the ``proto`` field of a connection's first frame."""
    proto = frame.get("proto")
    if proto != PROTO:
        raise WireError(ErrorCode.VERSION, f"expected proto {PROTO!r}, got {proto!r}")


@dataclass
class FrameDecoder:
    """Incremental decoder: feed bytes, get complete frames (and their blobs)."""

    max_size: int = MAX_FRAME
    max_blob: int = MAX_BLOB
    _buf: bytearray = field(default_factory=bytearray)
    _pending: dict[str, Any] | None = None

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        self._buf += data
        out: list[tuple[dict[str, Any], bytes]] = []
        while True:
            if self._pending is not None:
                need = int(self._pending["blob"])
                if len(self._buf) < need:
                    return out
                blob = bytes(self._buf[:need])
                del self._buf[:need]
                out.append((self._pending, blob))
                self._pending = None
                continue
            if len(self._buf) < HEADER_SIZE:
                return out
            (length,) = _HEADER.unpack_from(self._buf)
            check_length(length, self.max_size)
            if len(self._buf) < HEADER_SIZE + length:
                return out
            body = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length])
            del self._buf[: HEADER_SIZE + length]
            frame = decode_body(body)
            blob_len = frame.get("blob")
            if blob_len:
                check_length(int(blob_len), self.max_blob)
                self._pending = frame
            else:
                out.append((frame, b""))

    @property
    def buffered(self) -> int:
        return len(self._buf)


# --------------------------------------------------------------------------- asyncio helpers


async def _read_exactly(reader: asyncio.StreamReader, n: int, timeout: float | None) -> bytes:
    try:
        return await asyncio.wait_for(reader.readexactly(n), timeout)
    except asyncio.IncompleteReadError as exc:
        raise ConnectionClosed(
            "connection closed" if not exc.partial else "connection closed mid-frame"
        ) from None
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise ConnectionClosed(str(exc)) from None
    except asyncio.TimeoutError:
        raise FrameTimeout(f"no data for {timeout} s") from None


async def read_frame(
    reader: asyncio.StreamReader,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    max_size: int = MAX_FRAME,
) -> dict[str, Any]:
    """Read one frame. A frame announcing a blob is refused here (use :func:`read_message`)."""
    frame, _ = await read_message(reader, timeout=timeout, max_size=max_size, max_blob=0)
    return frame


async def read_message(
    reader: asyncio.StreamReader,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    max_size: int = MAX_FRAME,
    max_blob: int = MAX_BLOB,
) -> tuple[dict[str, Any], bytes]:
    """Read one frame and the blob it announces, if any.

    Raises :class:`WireError` for malformed or oversized input (the size is checked before
    the body is read), :class:`ConnectionClosed` and :class:`FrameTimeout`.
    """
    header = await _read_exactly(reader, HEADER_SIZE, timeout)
    (length,) = _HEADER.unpack(header)
    check_length(length, max_size)
    frame = decode_body(await _read_exactly(reader, length, timeout))
    blob_len = frame.get("blob") or 0
    if not blob_len:
        return frame, b""
    if blob_len > max_blob:
        raise WireError(ErrorCode.TOO_LARGE, f"payload of {blob_len} bytes exceeds {max_blob}")
    return frame, await _read_exactly(reader, blob_len, timeout)


def write_frame_nowait(writer: asyncio.StreamWriter, msg: Mapping[str, Any], blob: bytes = b"") -> None:
    if blob:
        msg = {**msg, "blob": len(blob)}
    writer.write(encode(msg))
    if blob:
        writer.write(blob)


async def write_frame(
    writer: asyncio.StreamWriter,
    msg: Mapping[str, Any],
    blob: bytes = b"",
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> None:
    """Write one frame (and blob) and wait for the transport to drain."""
    write_frame_nowait(writer, msg, blob)
    try:
        await asyncio.wait_for(writer.drain(), timeout)
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise ConnectionClosed(str(exc)) from None
    except asyncio.TimeoutError:
        raise FrameTimeout(f"peer did not read for {timeout} s") from None


async def send_error_and_close(writer: asyncio.StreamWriter, err: CrowddError) -> None:
    """Best effort: tell the peer what was wrong, then close."""
    try:
        await write_frame(writer, err.to_frame(), timeout=2.0)
    except Exception:  # noqa: BLE001 - the peer may already be gone
        pass
    await close_writer(writer)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 2.0)
    except Exception:  # noqa: BLE001 - closing a dead connection
        pass


def require(frame: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """Fetch a required field of a given type or raise a bad_field error naming it."""
    value = frame.get(name)
    if value is None or not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise WireError(ErrorCode.BAD_FIELD, f"field {name!r} must be {expected}", field=name)
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)

"""The codec (no I/O) and its asyncio helpers on real stream pairs."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdd import wire
from crowdd.wire import ErrorCode, FrameDecoder, WireError


def framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# --------------------------------------------------------------------------- encode / decode


def test_encode_decode_round_trip() -> None:
    msg = {"type": "hello", "proto": wire.PROTO, "name": "zoë", "n": [1, 2.5, None, True]}
    data = wire.encode(msg)
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    assert wire.decode_body(data[4:]) == msg


def test_encode_needs_string_type() -> None:
    with pytest.raises(ValueError, match="type"):
        wire.encode({"no": "type"})
    with pytest.raises(ValueError, match="type"):
        wire.encode({"type": 3})


def test_encode_sends_nan_and_infinity_as_null() -> None:
    import numpy as np

    frame = {"type": "x", "v": float("nan"), "deep": [{"a": float("inf")}, (float("-inf"), 1.5)],
             "np": np.float32("nan"), "ok": np.float32(0.5)}
    body = wire.encode(frame)[wire.HEADER_SIZE:]
    assert b"NaN" not in body and b"Infinity" not in body
    assert wire.decode_body(body) == {"type": "x", "v": None, "deep": [{"a": None}, [None, 1.5]],
                                      "np": None, "ok": 0.5}


def test_job_events_carry_a_diverged_loss_as_null() -> None:
    import io

    import numpy as np

    from crowdd.job.events import EventWriter, parse_event

    out = io.StringIO()
    EventWriter(out, clock=lambda: 1.0).emit("progress", loss=np.float32("nan"), accuracy=float("inf"), step=3)
    line = out.getvalue()
    assert "NaN" not in line and "Infinity" not in line
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))
    assert parse_event(line) == {"event": "progress", "time": 1.0, "loss": None, "accuracy": None, "step": 3}


def test_encode_too_large() -> None:
    with pytest.raises(WireError) as info:
        wire.encode({"type": "x", "pad": "a" * 200}, max_size=100)
    assert info.value.code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\xff\xfe", "UTF-8 JSON"),
        (b"{not json", "UTF-8 JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (b"{}", "no string 'type'"),
        (b'{"type": 1}', "no string 'type'"),
        (b'{"type": "x", "blob": -1}', "blob"),
        (b'{"type": "x", "blob": "3"}', "blob"),
        (b'{"type": "x", "blob": true}', "blob"),
        (b"[" * 100_000 + b"]" * 100_000, "UTF-8 JSON"),
    ],
    ids=["utf8", "json", "list", "string", "no-type", "int-type", "neg-blob", "str-blob", "bool-blob", "deep"],
)
def test_decode_body_rejects(body: bytes, fragment: str) -> None:
    with pytest.raises(WireError) as info:
        wire.decode_body(body)
    assert info.value.code is ErrorCode.BAD_FRAME
    assert fragment in info.value.message


def test_error_frames() -> None:
    err = WireError(ErrorCode.BAD_FIELD, "field 'x' must be int", field="x")
    assert err.to_frame() == {"type": "error", "code": "bad_field", "message": "field 'x' must be int", "field": "x"}
    assert wire.error_frame(ErrorCode.BUSY, "full") == {"type": "error", "code": "busy", "message": "full"}
    with pytest.raises(wire.RemoteError) as info:
        wire.raise_if_error(err.to_frame())
    assert (info.value.code, info.value.field) == ("bad_field", "x")
    wire.raise_if_error({"type": "ok"})


def test_error_codes_are_the_documented_set() -> None:
    assert {c.value for c in ErrorCode} == {
        "bad_frame", "too_large", "unknown_type", "bad_field", "version", "unauthorized", "busy", "unreachable", "internal",
    }


def test_check_proto() -> None:
    wire.check_proto({"type": "hello", "proto": "crowdd/1"})
    for bad in ({"type": "hello"}, {"type": "hello", "proto": "crowdd/2"}, {"type": "hello", "proto": 1}):
        with pytest.raises(WireError) as info:
            wire.check_proto(bad)
        assert info.value.code is ErrorCode.VERSION


def test_require() -> None:
    frame = {"type": "x", "n": 3, "flag": True, "s": "v"}
    assert wire.require(frame, "n", int) == 3
    assert wire.require(frame, "flag", bool) is True
    assert wire.require(frame, "s", (str, int)) == "v"
    for name, kind in (("missing", int), ("s", int), ("flag", int)):  # a bool is not an int
        with pytest.raises(WireError) as info:
            wire.require(frame, name, kind)
        assert info.value.code is ErrorCode.BAD_FIELD and info.value.field == name


# --------------------------------------------------------------------------- FrameDecoder


def test_decoder_byte_by_byte_and_many_per_chunk() -> None:
    msgs: list[dict[str, Any]] = [{"type": "a", "i": i} for i in range(5)]
    data = b"".join(wire.encode(m) for m in msgs)
    dec = FrameDecoder()
    out = []
    for b in data:
        out += dec.feed(bytes([b]))
    assert [f for f, _ in out] == msgs
    assert dec.buffered == 0
    assert [f for f, _ in FrameDecoder().feed(data)] == msgs


def test_decoder_blobs() -> None:
    payload = bytes(range(256)) * 4
    data = wire.encode({"type": "chunk", "blob": len(payload)}) + payload + wire.encode({"type": "end"})
    dec = FrameDecoder()
    out = dec.feed(data[:10]) + dec.feed(data[10:700]) + dec.feed(data[700:])
    assert out[0] == ({"type": "chunk", "blob": len(payload)}, payload)
    assert out[1] == ({"type": "end"}, b"")


def test_decoder_zero_blob_is_plain_frame() -> None:
    assert FrameDecoder().feed(wire.encode({"type": "x", "blob": 0})) == [({"type": "x", "blob": 0}, b"")]


def test_decoder_size_checked_before_body() -> None:
    dec = FrameDecoder(max_size=100)
    with pytest.raises(WireError) as info:
        dec.feed(struct.pack(">I", 101))  # only the header: no body was needed to refuse it
    assert info.value.code is ErrorCode.TOO_LARGE


def test_decoder_blob_limit() -> None:
    dec = FrameDecoder(max_blob=10)
    with pytest.raises(WireError) as info:
        dec.feed(wire.encode({"type": "chunk", "blob": 11}))
    assert info.value.code is ErrorCode.TOO_LARGE


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_decoder_never_raises_anything_but_wire_error(chunks: list[bytes]) -> None:
    dec = FrameDecoder(max_size=4096, max_blob=4096)
    try:
        for chunk in chunks:
            for frame, blob in dec.feed(chunk):
                assert isinstance(frame, dict) and isinstance(frame["type"], str)
                assert isinstance(blob, bytes)
    except WireError as exc:
        assert exc.code in (ErrorCode.BAD_FRAME, ErrorCode.TOO_LARGE)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(), _json, max_size=5), st.text(min_size=1), st.integers(1, 50))
def test_decoder_round_trips_any_frame_in_any_split(extra: dict[str, Any], kind: str, split: int) -> None:
    msg = {**{k: v for k, v in extra.items() if k != "blob"}, "type": kind}
    data = wire.encode(msg) * 2
    dec = FrameDecoder()
    out = []
    for i in range(0, len(data), split):
        out += dec.feed(data[i : i + split])
    assert [f for f, _ in out] == [json.loads(json.dumps(msg))] * 2


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_on_framed_garbage(body: bytes) -> None:
    try:
        FrameDecoder().feed(framed(body))
    except WireError:
        pass


# --------------------------------------------------------------------------- asyncio helpers (real sockets)


Pair = tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamReader, asyncio.StreamWriter, asyncio.Server]


async def _pair() -> Pair:
    """(server reader, server writer, client reader, client writer, server) over loopback TCP."""
    got: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.get_running_loop().create_future()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.set_result((r, w))

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    client_r, client_w = await asyncio.open_connection(*srv.sockets[0].getsockname()[:2])
    server_r, server_w = await got
    return server_r, server_w, client_r, client_w, srv


def _close(*things: asyncio.StreamWriter | asyncio.Server) -> None:
    for t in things:
        t.close()


async def test_read_write_frame_and_blob() -> None:
    r, sw, _cr, w, srv = await _pair()
    try:
        await wire.write_frame(w, {"type": "a", "x": 1})
        await wire.write_frame(w, {"type": "chunk"}, b"\x00\x01\x02")
        assert await wire.read_frame(r) == {"type": "a", "x": 1}
        frame, blob = await wire.read_message(r)
        assert frame == {"type": "chunk", "blob": 3} and blob == b"\x00\x01\x02"
    finally:
        _close(w, sw, srv)


async def test_read_frame_refuses_blob() -> None:
    r, sw, _cr, w, srv = await _pair()
    try:
        await wire.write_frame(w, {"type": "chunk"}, b"abc")
        with pytest.raises(WireError) as info:
            await wire.read_frame(r)
        assert info.value.code is ErrorCode.TOO_LARGE
    finally:
        _close(w, sw, srv)


async def test_read_size_checked_before_body() -> None:
    r, sw, _cr, w, srv = await _pair()
    try:
        w.write(struct.pack(">I", wire.MAX_FRAME + 1))  # the body never comes
        await w.drain()
        with pytest.raises(WireError) as info:
            await wire.read_frame(r, timeout=5)
        assert info.value.code is ErrorCode.TOO_LARGE
    finally:
        _close(w, sw, srv)


async def test_read_timeout_and_close_mid_frame() -> None:
    r, sw, _cr, w, srv = await _pair()
    try:
        with pytest.raises(wire.FrameTimeout):
            await wire.read_frame(r, timeout=0.1)
        w.write(wire.encode({"type": "x"})[:5])
        await w.drain()
        with pytest.raises(wire.FrameTimeout):
            await wire.read_frame(r, timeout=0.1)  # stalled mid-frame
        w.close()
        with pytest.raises(wire.ConnectionClosed, match="mid-frame"):
            await wire.read_frame(r, timeout=5)
    finally:
        _close(sw, srv)


async def test_read_clean_close() -> None:
    r, sw, _cr, w, srv = await _pair()
    try:
        w.close()
        with pytest.raises(wire.ConnectionClosed, match="^connection closed$"):
            await wire.read_frame(r, timeout=5)
    finally:
        _close(sw, srv)


async def test_send_error_and_close() -> None:
    _r, sw, cr, w, srv = await _pair()
    try:
        await wire.send_error_and_close(sw, WireError(ErrorCode.BUSY, "full"))
        assert await wire.read_frame(cr) == {"type": "error", "code": "busy", "message": "full"}
        with pytest.raises(wire.ConnectionClosed):
            await wire.read_frame(cr)
    finally:
        _close(w, srv)

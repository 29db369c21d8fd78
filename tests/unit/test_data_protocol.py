"""The data protocol's messages: every frame round-trips; every malformed field is named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from crowdd import wire
from crowdd.errors import ErrorCode, RemoteError
from crowdd.data.manifest import Manifest, ManifestError
from crowdd.protocol import data

N = 10  # chunks in the manifest the frames refer to


def roundtrip(frame: dict[str, Any]) -> dict[str, Any]:
    """What the peer decodes from a frame we encode."""
    return wire.decode_body(wire.encode(frame)[wire.HEADER_SIZE :])


def bad_field(exc: pytest.ExceptionInfo[wire.WireError], field: str) -> None:
    assert exc.value.code is ErrorCode.BAD_FIELD
    assert exc.value.field == field
    assert field in exc.value.message


# --------------------------------------------------------------------------- hello


def test_hello_round_trip() -> None:
    assert data.check_hello(roundtrip({"type": "x", **data.make_hello(3)}), group_size=4) == 3
    assert data.check_hello(data.make_hello(1000)) == 1000  # no group size: any index


@pytest.mark.parametrize("hello", [{}, {"index": "1"}, {"index": True}, {"index": -1}, {"index": 4}, {"index": 1.0}])
def test_bad_hello_index_names_the_field(hello: dict[str, Any]) -> None:
    with pytest.raises(wire.WireError) as exc:
        data.check_hello(hello, group_size=4)
    bad_field(exc, "index")


# --------------------------------------------------------------------------- bitmap


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 64])
def test_bitmap_round_trip(n: int) -> None:
    held = tuple(i % 3 == 1 for i in range(n))
    assert data.decode_bitmap(data.encode_bitmap(held), n) == held


def test_bitmap_is_little_endian_hex() -> None:
    assert data.encode_bitmap((False, True, False)) == "02"
    assert data.encode_bitmap((True,) * 9) == "ff01"


@pytest.mark.parametrize("value", [None, 3, "zz", "02", "ffff00", "0004"])
def test_bad_bitmap_names_the_field(value: Any) -> None:
    with pytest.raises(wire.WireError) as exc:
        data.decode_bitmap(value, N)  # N = 10 chunks: exactly 2 bytes, bits 10.. clear
    bad_field(exc, "bitmap")


# --------------------------------------------------------------------------- requests


@pytest.mark.parametrize(
    "request_",
    [data.HaveRequest(), data.ManifestRequest(), data.GetRequest((0, 9, 3)), data.GetRequest((), wait=False)],
)
def test_requests_round_trip(request_: data.Request) -> None:
    assert data.check_request(roundtrip(request_.to_frame()), N) == request_


def test_get_waits_unless_told_otherwise() -> None:
    assert data.check_request({"type": "get", "chunks": [1]}, N) == data.GetRequest((1,), wait=True)


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"type": "get"}, "chunks"),
        ({"type": "get", "chunks": "all"}, "chunks"),
        ({"type": "get", "chunks": [N]}, "chunks"),
        ({"type": "get", "chunks": [-1]}, "chunks"),
        ({"type": "get", "chunks": [True]}, "chunks"),
        ({"type": "get", "chunks": [1.5]}, "chunks"),
        ({"type": "get", "chunks": [1], "wait": "yes"}, "wait"),
        ({"type": "get", "chunks": [1], "wait": None}, "wait"),
    ],
)
def test_bad_request_names_the_field(frame: dict[str, Any], field: str) -> None:
    with pytest.raises(wire.WireError) as exc:
        data.check_request(frame, N)
    bad_field(exc, field)


def test_unknown_request_is_unknown_type() -> None:
    with pytest.raises(wire.WireError) as exc:
        data.check_request({"type": "delete"}, N)
    assert exc.value.code is ErrorCode.UNKNOWN_TYPE and "delete" in exc.value.message


# --------------------------------------------------------------------------- have reply


def test_have_reply_round_trip() -> None:
    reply = data.HaveReply(2, False, tuple(i in (3, 9) for i in range(N)))
    assert data.check_have_reply(roundtrip(reply.to_frame()), N) == reply


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"count": -1}, "count"),
        ({"count": "2"}, "count"),
        ({"count": None}, "count"),
        ({"complete": 1}, "complete"),
        ({"complete": None}, "complete"),
        ({"bitmap": None}, "bitmap"),
        ({"bitmap": "0"}, "bitmap"),
        ({"bitmap": "00"}, "bitmap"),
    ],
)
def test_bad_have_reply_names_the_field(change: dict[str, Any], field: str) -> None:
    frame = {**data.HaveReply(0, False, (False,) * N).to_frame(), **change}
    with pytest.raises(wire.WireError) as exc:
        data.check_have_reply(frame, N)
    bad_field(exc, field)


def test_replies_turn_an_error_frame_into_remote_error() -> None:
    err = wire.WireError(ErrorCode.UNAUTHORIZED, "no").to_frame()
    with pytest.raises(RemoteError) as exc:
        data.check_have_reply(err, N)
    assert exc.value.code is ErrorCode.UNAUTHORIZED
    with pytest.raises(RemoteError):
        data.check_stream_frame(err, None, N)
    with pytest.raises(RemoteError):
        data.check_manifest_reply(err, b"", "0" * 64)


def test_reply_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(wire.WireError) as exc:
        data.check_have_reply({"type": "manifest"}, N)
    assert exc.value.code is ErrorCode.UNKNOWN_TYPE


# --------------------------------------------------------------------------- manifest reply


@pytest.fixture
def manifest(tmp_path: Path) -> Manifest:
    src = tmp_path / "d.bin"
    src.write_bytes(bytes(range(256)) * 40)
    return Manifest.build(src, chunk_size=1024, name="d")


def test_manifest_reply_round_trip(manifest: Manifest) -> None:
    frame, blob = data.ManifestReply(manifest).to_message()
    assert data.check_manifest_reply(roundtrip(frame), blob, manifest.digest()) == manifest


def test_manifest_reply_is_checked_against_the_digest(manifest: Manifest) -> None:
    frame, blob = data.ManifestReply(manifest).to_message()
    with pytest.raises(ManifestError, match="digest"):
        data.check_manifest_reply(frame, blob, "0" * 64)
    with pytest.raises(wire.WireError) as exc:
        data.check_manifest_reply({"type": "have"}, blob, manifest.digest())
    assert exc.value.code is ErrorCode.UNKNOWN_TYPE


# --------------------------------------------------------------------------- the answer to get


@pytest.mark.parametrize("msg", [data.Missing(4), data.Queued(), data.ChunkWait(), data.End()])
def test_stream_frames_round_trip(msg: data.StreamMessage) -> None:
    assert data.check_stream_frame(roundtrip(msg.to_frame()), None, N) == msg


def test_chunk_frame_announces_its_blob() -> None:
    frame = roundtrip(data.Chunk(7, 1024).to_frame())
    assert frame["blob"] == 1024
    assert data.check_stream_frame(frame, 1024, N) == data.Chunk(7, 1024)


@pytest.mark.parametrize(
    ("frame", "blob_len", "field"),
    [
        ({"type": "chunk", "index": N}, 8, "index"),
        ({"type": "chunk", "index": "1"}, 8, "index"),
        ({"type": "chunk", "index": False}, 8, "index"),
        ({"type": "chunk"}, 8, "index"),
        ({"type": "chunk", "index": 1}, None, "blob"),
        ({"type": "chunk", "index": 1}, 0, "blob"),
    ],
)
def test_bad_chunk_frame_is_a_bad_chunk(frame: dict[str, Any], blob_len: int | None, field: str) -> None:
    with pytest.raises(data.BadChunk) as exc:
        data.check_stream_frame(frame, blob_len, N)
    bad_field(exc, field)  # type: ignore[arg-type]


@pytest.mark.parametrize("frame", [{"type": "missing"}, {"type": "missing", "index": -1}, {"type": "missing", "index": N}])
def test_bad_missing_frame_names_the_index(frame: dict[str, Any]) -> None:
    with pytest.raises(wire.WireError) as exc:
        data.check_stream_frame(frame, None, N)
    assert not isinstance(exc.value, data.BadChunk)
    bad_field(exc, "index")


def test_unexpected_stream_frame_is_unknown_type() -> None:
    with pytest.raises(wire.WireError) as exc:
        data.check_stream_frame({"type": "have"}, None, N)
    assert exc.value.code is ErrorCode.UNKNOWN_TYPE and "have" in exc.value.message

"""crowdd.data.manifest: build, verify, canonical JSON, digest, and every malformed manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from crowdd.data.manifest import DEFAULT_CHUNK, Layout, Manifest, ManifestError
from crowdd.route import MAX_CHUNK

LAYOUT = Layout(feature_shape=(2, 3), feature_dtype="uint8", scale=1 / 255, num_classes=3, train_count=8, test_count=2)


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    p = tmp_path / "d.data"
    p.write_bytes(bytes(range(100)))  # 10 records of 10 bytes, matches LAYOUT
    return p


def test_layout_sizes() -> None:
    assert LAYOUT.feature_count == 6
    assert LAYOUT.record_bytes == 10
    assert LAYOUT.test_offset == 80
    assert LAYOUT.total_bytes == 100
    f32 = Layout((4,), "float32", 1.0, 2, 1, 0)
    assert f32.record_bytes == 4 + 16
    d = LAYOUT.to_dict()
    assert d["record_bytes"] == 10 and d["label_bytes"] == 4 and d["test_offset"] == 80
    assert Layout.from_dict(d) == LAYOUT


def test_build_chunks(data_file: Path) -> None:
    m = Manifest.build(data_file, chunk_size=32, layout=LAYOUT, name="toy")
    raw = data_file.read_bytes()
    assert m.size == 100
    assert m.num_chunks == 4
    assert m.chunk_span(3) == (96, 4)
    assert m.chunks[0] == hashlib.sha256(raw[:32]).hexdigest()
    assert m.sha256 == hashlib.sha256(raw).hexdigest()
    assert m.chunk_ok(1, raw[32:64])
    assert not m.chunk_ok(1, raw[32:63])
    assert not m.chunk_ok(1, b"x" + raw[33:64])
    with pytest.raises(ManifestError, match="chunk 4 out of range 0..3"):
        m.chunk_span(4)
    with pytest.raises(ManifestError, match="out of range"):
        m.chunk_ok(-1, b"")
    m.verify_file(data_file)


def test_build_default_chunk_and_empty(tmp_path: Path) -> None:
    p = tmp_path / "e"
    p.write_bytes(b"")
    m = Manifest.build(p)
    assert (m.size, m.num_chunks, m.chunk_size) == (0, 0, DEFAULT_CHUNK)
    assert Manifest.from_json(m.to_json()) == m


def test_build_refuses_layout_size_mismatch(data_file: Path) -> None:
    wrong = Layout((2, 3), "uint8", 1.0, 3, 9, 2)
    with pytest.raises(ManifestError, match=r"layout describes 110 bytes but .*d\.data has 100"):
        Manifest.build(data_file, layout=wrong)


def test_json_round_trip_and_digest(data_file: Path) -> None:
    m = Manifest.build(data_file, chunk_size=32, layout=LAYOUT, name="toy")
    raw = m.to_json()
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    assert m.digest() == hashlib.sha256(raw).hexdigest()
    back = Manifest.from_json(raw, expect_digest=m.digest())
    assert back == m
    assert back.digest() == m.digest()
    # same content, pretty-printed: parses, still the same digest (digest is of canonical JSON)
    pretty = json.dumps(json.loads(raw), indent=2)
    assert Manifest.from_json(pretty, expect_digest=m.digest()) == m


def test_expect_digest_refuses_other_manifest(data_file: Path) -> None:
    m = Manifest.build(data_file, chunk_size=32, layout=LAYOUT, name="toy")
    other = Manifest.build(data_file, chunk_size=32, layout=LAYOUT, name="renamed")
    with pytest.raises(ManifestError, match="does not match the digest from the matchmaker"):
        Manifest.from_json(other.to_json(), expect_digest=m.digest())


def test_verify_file_detects_change(data_file: Path) -> None:
    m = Manifest.build(data_file, chunk_size=32)
    data_file.write_bytes(bytes(range(99)) + b"\xff")
    with pytest.raises(ManifestError, match="does not match the manifest"):
        m.verify_file(data_file)
    data_file.write_bytes(bytes(range(99)))
    with pytest.raises(ManifestError, match="does not match the manifest"):
        m.verify_file(data_file)


def _good(data_file: Path) -> dict[str, Any]:
    return Manifest.build(data_file, chunk_size=32, layout=LAYOUT, name="toy").to_dict()


def _edit(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    d = json.loads(json.dumps(d))
    keys = path.split(".")
    target = d
    for k in keys[:-1]:
        target = target[k]
    if value is _DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return d


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "pattern"),
    [
        ("version", 2, "unsupported manifest version 2"),
        ("version", _DELETE, "unsupported manifest version None"),
        ("size", _DELETE, "bad manifest"),
        ("size", "lots", "bad manifest"),
        ("chunks", None, "bad manifest"),
        ("size", 200, "size, chunk size and chunk count disagree"),
        ("chunk_size", 0, "chunk size 0 bytes is outside"),
        ("size", -1, "size, chunk size and chunk count disagree"),
        ("sha256", "abc", "sha256 hex"),
        ("sha256", "g" * 64, "sha256 hex"),
        ("chunks", ["0" * 64, "1" * 64, "2" * 64, "X" * 64], "sha256 hex"),
        ("layout", "flat", "layout must be an object"),
        ("layout.feature_dtype", "int64", "unknown feature_dtype 'int64'"),
        ("layout.feature_shape", [], "feature_shape must be positive"),
        ("layout.feature_shape", [2, 0], "feature_shape must be positive"),
        ("layout.feature_shape", 6, "bad layout"),
        ("layout.num_classes", 1, ">= 2 classes"),
        ("layout.train_count", 0, ">= 1 training record"),
        ("layout.scale", _DELETE, "bad layout"),
        ("layout.test_count", 3, "layout describes 110 bytes but the file has 100"),
        ("layout.record_bytes", 11, "layout record_bytes is 11 but its fields give 10"),
        ("layout.test_offset", 0, "layout test_offset is 0 but its fields give 80"),
    ],
)
def test_corrupt_manifests(data_file: Path, path: str, value: Any, pattern: str) -> None:
    bad = _edit(_good(data_file), path, value)
    with pytest.raises(ManifestError, match=pattern):
        Manifest.from_json(json.dumps(bad))


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"[1, 2]", b'"manifest"', b"null"])
def test_not_a_manifest(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(raw)


def test_manifest_without_layout(data_file: Path) -> None:
    d = _edit(_good(data_file), "layout", None)
    m = Manifest.from_json(json.dumps(d))
    assert m.layout is None
    assert m.size == 100


def test_a_hosts_manifest_with_a_huge_chunk_is_refused_before_anything_is_allocated() -> None:
    """A malicious host's manifest: one 1 GiB chunk would make every worker hold a 1 GiB buffer
    (and its size would fill their disks); the largest chunk a member accepts is refused past."""
    def manifest(chunk: int) -> dict[str, Any]:
        return {"version": 1, "name": "x", "size": chunk, "chunk_size": chunk, "chunks": ["0" * 64],
                "sha256": "0" * 64, "layout": None}

    with pytest.raises(ManifestError, match="chunk size 1,073,741,824 bytes is outside 1..16,777,216"):
        Manifest.from_dict(manifest(1 << 30))
    assert Manifest.from_dict(manifest(MAX_CHUNK)).chunk_size == MAX_CHUNK  # the control: the largest allowed


def test_manifest_error_is_value_error() -> None:
    assert issubclass(ManifestError, ValueError)

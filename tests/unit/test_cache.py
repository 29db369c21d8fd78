"""The dataset cache keeps files by sha256 and trusts only verified ones."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from crowdd.data.cache import CacheError, DatasetCache
from crowdd.data.manifest import Manifest


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Manifest]:
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(300_000))
    return src, Manifest.build(src, chunk_size=64 << 10)


def test_add_file_installs_by_sha_with_manifest_and_marker(tmp_path: Path, data: tuple[Path, Manifest]) -> None:
    src, manifest = data
    cache = DatasetCache(tmp_path / "cache")
    assert cache.has(manifest) is None
    path = cache.add_file(src, manifest)
    assert path.name == f"{manifest.sha256}.data"
    assert path.read_bytes() == src.read_bytes()
    assert cache.has(manifest) == path
    assert cache.load_manifest(manifest.sha256) == manifest
    assert not [p for p in cache.root.iterdir() if p.name.endswith(".tmp")]


def test_install_refuses_a_file_that_does_not_match(tmp_path: Path, data: tuple[Path, Manifest]) -> None:
    _, manifest = data
    cache = DatasetCache(tmp_path / "cache")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"x" * manifest.size)
    with pytest.raises(CacheError, match="does not match"):
        cache.install(bad, manifest)
    assert bad.exists()  # nothing lost
    assert cache.has(manifest) is None


def test_a_file_changed_after_install_is_no_longer_trusted(tmp_path: Path, data: tuple[Path, Manifest]) -> None:
    src, manifest = data
    cache = DatasetCache(tmp_path / "cache")
    path = cache.add_file(src, manifest)
    raw = bytearray(path.read_bytes())
    raw[10] ^= 1
    path.write_bytes(bytes(raw))
    assert cache.has(manifest) is None


def test_marker_is_only_trusted_for_its_own_manifest(tmp_path: Path, data: tuple[Path, Manifest]) -> None:
    """A file checked chunk by chunk against one manifest is re-hashed whole for another."""
    _, manifest = data
    cache = DatasetCache(tmp_path / "cache")
    lying = dataclasses.replace(manifest, name="other")  # same sha256, different manifest digest
    tmp = tmp_path / "dl"
    tmp.write_bytes(b"y" * manifest.size)
    cache.install(tmp, lying, verified=True)  # as if a (malicious) group had installed it
    assert cache.has(lying) is not None
    assert cache.has(manifest) is None  # whole sha256 does not match: not trusted


def test_bad_sha_is_refused(tmp_path: Path, data: tuple[Path, Manifest]) -> None:
    cache = DatasetCache(tmp_path / "cache")
    with pytest.raises(CacheError, match="sha256"):
        cache.load_manifest("../../etc/passwd")

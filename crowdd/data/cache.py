"""The dataset cache: canonical files kept by their sha256.

Layout under ``root``::

    <sha>.data            the verified file (installed by an atomic rename)
    <sha>.manifest.json   its manifest (canonical JSON)
    <sha>.verified        marker written after verification: size, mtime and the digest of
                          the manifest the file was checked against
    <sha>.partial         a download in progress (chunks are written in place)

A node that already holds a file (:meth:`DatasetCache.has`) skips the transfer.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from crowdd.data.manifest import Manifest, ManifestError

logger = logging.getLogger(__name__)


class CacheError(Exception):
    """A file that cannot be installed (it does not match its manifest)."""


def _check_sha(sha: str) -> str:
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise CacheError(f"not a sha256 hex digest: {sha!r}")
    return sha


class DatasetCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def data_path(self, manifest: Manifest) -> Path:
        return self.root / f"{_check_sha(manifest.sha256)}.data"

    def manifest_path(self, manifest: Manifest) -> Path:
        return self.root / f"{_check_sha(manifest.sha256)}.manifest.json"

    def partial_path(self, manifest: Manifest) -> Path:
        return self.root / f"{_check_sha(manifest.sha256)}.partial"

    def _marker_path(self, manifest: Manifest) -> Path:
        return self.root / f"{_check_sha(manifest.sha256)}.verified"

    def has(self, manifest: Manifest) -> Path | None:
        """The cached file if it is present and verified, else None.

        A file is verified by its marker (trusted only while size and mtime are unchanged
        and only for the manifest it was written for) or by hashing it whole now.
        """
        path = self.data_path(manifest)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if st.st_size != manifest.size:
            return None
        if self._marker_matches(manifest, st):
            return path
        try:
            manifest.verify_file(path)
        except (ManifestError, OSError):
            logger.warning("cached %s does not match its manifest; ignoring it", path)
            return None
        self._write_marker(manifest, path)
        return path

    def _marker_matches(self, manifest: Manifest, st: os.stat_result) -> bool:
        try:
            marker = json.loads(self._marker_path(manifest).read_text())
        except (OSError, ValueError):
            return False
        return (
            isinstance(marker, dict)
            and marker.get("size") == st.st_size
            and marker.get("mtime_ns") == st.st_mtime_ns
            and marker.get("sha256") == manifest.sha256
            and marker.get("manifest") == manifest.digest()
        )

    def _write_marker(self, manifest: Manifest, path: Path) -> None:
        st = path.stat()
        marker = {"sha256": manifest.sha256, "manifest": manifest.digest(), "size": st.st_size,
                  "mtime_ns": st.st_mtime_ns}
        _atomic_write(self._marker_path(manifest), json.dumps(marker).encode())

    def store_manifest(self, manifest: Manifest) -> Path:
        self.ensure()
        path = self.manifest_path(manifest)
        _atomic_write(path, manifest.to_json())
        return path

    def load_manifest(self, sha256: str) -> Manifest | None:
        path = self.root / f"{_check_sha(sha256)}.manifest.json"
        try:
            return Manifest.from_json(path.read_bytes())
        except (OSError, ManifestError):
            return None

    def install(self, tmp_path: Path, manifest: Manifest, *, verified: bool = False) -> Path:
        """Move a finished download into place atomically (same filesystem).

        Unless ``verified`` (the caller checked every chunk against this manifest), the
        file is hashed first; a mismatch raises :class:`CacheError` and leaves the file.
        """
        self.ensure()
        if not verified:
            try:
                manifest.verify_file(tmp_path)
            except ManifestError as exc:
                raise CacheError(str(exc)) from None
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        dest = self.data_path(manifest)
        os.replace(tmp_path, dest)
        _fsync_dir(self.root)
        self._write_marker(manifest, dest)
        self.store_manifest(manifest)
        return dest

    def add_file(self, path: Path, manifest: Manifest) -> Path:
        """Copy an existing canonical file into the cache (the host's own dataset)."""
        if (got := self.has(manifest)) is not None:
            return got
        self.ensure()
        tmp = self.root / f".{manifest.sha256}.{os.getpid()}.tmp"
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            return self.install(tmp, manifest)
        finally:
            tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

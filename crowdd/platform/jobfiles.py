"""The daemon's reads and writes inside a job's work directory, which the group's graphs can write.

A graph can plant a symbolic link, a FIFO or a device node anywhere in the work directory, or
swap a subdirectory for a link, between two of the daemon's steps. So every path is walked
from a descriptor of the work directory (which the job cannot replace: it cannot write the
directory above it), one component at a time with ``O_NOFOLLOW``:

- :func:`read` opens only a regular file (never a link, FIFO or device, so ``/dev/zero``
  cannot hang the daemon), of at most ``limit`` bytes;
- :func:`write` writes a fresh file with a random ``O_EXCL`` name and renames it over the
  target (a link planted at the target is replaced, never followed);
- :func:`relative` turns a path a job reported into one inside its work directory, or refuses.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from crowdd.errors import CrowddError

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class JobFileError(CrowddError):
    """A file in a job's work directory is not what the daemon may read or write."""


def relative(workdir: Path, reported: object) -> PurePosixPath:
    """``reported`` (a path a job named, relative to ``workdir`` or absolute below it) as a
    relative path with no ``..``; :class:`JobFileError` if it is not inside ``workdir``."""
    if not isinstance(reported, str) or not reported or "\0" in reported:
        raise JobFileError(f"the job named no usable path ({reported!r})")
    p = PurePosixPath(reported)
    if p.is_absolute():
        try:
            p = p.relative_to(PurePosixPath(workdir))
        except ValueError:
            raise JobFileError(f"the job named a path outside its work directory: {reported!r}") from None
    if not p.parts or any(part in ("..", ".") for part in p.parts):
        raise JobFileError(f"the job named a path outside its work directory: {reported!r}")
    return p


@contextlib.contextmanager
def _parent(workdir: Path, rel: PurePosixPath) -> Iterator[int]:
    """A descriptor of ``rel``'s directory, walked from ``workdir`` without following a link."""
    fd = os.open(workdir, _DIR)
    try:
        for part in rel.parts[:-1]:
            try:
                nxt = os.open(part, _DIR, dir_fd=fd)
            except OSError as exc:
                raise JobFileError(f"{rel}: {part} is not a directory of the job's ({exc.strerror})") from None
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _regular(workdir: Path, rel: PurePosixPath) -> Iterator[tuple[int, os.stat_result]]:
    """A read-only descriptor of the regular file ``workdir/rel`` (never through a link)."""
    with _parent(workdir, rel) as dfd:
        try:
            fd = os.open(rel.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            raise JobFileError(f"cannot open {rel} in the job's directory: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise JobFileError(f"{rel} in the job's directory is not a regular file")
            yield fd, st
        finally:
            os.close(fd)


def read(workdir: Path, rel: PurePosixPath | str, limit: int) -> bytes:
    """The regular file ``workdir/rel``, at most ``limit`` bytes (:class:`JobFileError` else)."""
    rel = relative(workdir, str(rel))
    with _regular(workdir, rel) as (fd, st):
        if st.st_size > limit:
            raise JobFileError(f"{rel} in the job's directory is {st.st_size:,} bytes (at most {limit:,})")
        data = os.read(fd, limit + 1)
    if len(data) > limit:
        raise JobFileError(f"{rel} in the job's directory grew past {limit:,} bytes")
    return data


def sha256(workdir: Path, rel: PurePosixPath | str) -> str:
    """The SHA-256 (hex) of the regular file ``workdir/rel``, read through one descriptor."""
    rel = relative(workdir, str(rel))
    digest = hashlib.sha256()
    with _regular(workdir, rel) as (fd, _st):
        while block := os.read(fd, 1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write(workdir: Path, rel: PurePosixPath | str, data: bytes) -> None:
    """Make ``workdir/rel`` hold ``data``: a fresh file renamed over it (never through a link);
    :class:`JobFileError` if it cannot (a directory a job left at that name, say)."""
    rel = relative(workdir, str(rel))
    with _parent(workdir, rel) as dfd:
        tmp = f".{rel.name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, rel.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise JobFileError(f"cannot write {rel} in the job's directory: {exc.strerror or exc}") from None


def link(workdir: Path, name: str, target: Path) -> None:
    """Make ``workdir/name`` a symbolic link to ``target``, whatever a job left there (a file,
    a link, a directory tree: removed without following a link); :class:`JobFileError` if it
    cannot."""
    rel = relative(workdir, name)
    with _parent(workdir, rel) as dfd:
        tmp = f".{rel.name}.{secrets.token_hex(8)}.tmp"
        try:
            os.symlink(target, tmp, dir_fd=dfd)
            try:
                st = os.stat(rel.name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                shutil.rmtree(rel.name, dir_fd=dfd)  # fd-based: never walks through a link
            os.replace(tmp, rel.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise JobFileError(f"cannot link {rel} in the job's directory to {target}: {exc.strerror or exc}") from None


def is_file(workdir: Path, reported: object) -> PurePosixPath:
    """``reported`` as a path inside ``workdir`` that names a regular file there (not a link);
    :class:`JobFileError` otherwise."""
    rel = relative(workdir, reported)
    with _parent(workdir, rel) as dfd:
        try:
            st = os.stat(rel.name, dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            raise JobFileError(f"{rel} in the job's directory: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise JobFileError(f"{rel} in the job's directory is not a regular file")
    return rel


__all__ = ["JobFileError", "is_file", "link", "read", "relative", "sha256", "write"]

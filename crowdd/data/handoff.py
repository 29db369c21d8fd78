"""Handing a dataset's open files to the daemon (``SCM_RIGHTS`` over the control socket).

The system service cannot see ``/home`` (``ProtectHome=yes``) and runs as its own user, so it
never opens a user's dataset by path. Instead ``crowdd host FILE`` opens the file itself, with
the user's own permissions, and passes the open descriptors over the Unix control socket; the
daemon copies them into its cache. Whoever can read a file can host it; whoever can't, can't
(the open fails in the CLI, before anything reaches the daemon).

The exchange on one control connection (:mod:`crowdd.node.control`)::

    client → {"type": "host", "dataset": "/home/a/x.npz", "files": [{"name": "x.npz", "size": N}], "job": {...}}
    daemon → {"type": "send_files"}          (it has stopped reading the stream)
    client → one byte b"F" carrying the descriptors as SCM_RIGHTS ancillary data
    daemon → ok | error                      (after copying them into its cache)

A dataset is a file (one descriptor) or a directory of IDX files (one per IDX file in it;
:data:`IDX_NAME`). Only regular files are taken: a FIFO or a device could stall the daemon.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crowdd.errors import InputError

#: the byte that carries the descriptors
MARK = b"F"
#: at most this many files per dataset (the kernel's limit per message is 253)
MAX_FILES = 16
#: names the daemon accepts for a handed file (what ``datasets`` can read; no path parts)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
#: the IDX files of an MNIST-style directory (:func:`crowdd.data.datasets.idx_files`)
IDX_NAME = re.compile(r"^(train|t10k)-(images|labels)[-.]idx[13]-ubyte(\.gz)?$")


def check_name(name: Any, where: str = "files") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(f"a handed file needs a plain file name (letters, digits, . _ + -), got {name!r}",
                         field=where)
    return name


# --------------------------------------------------------------------------- the client side


@dataclass
class OpenFiles:
    """A dataset's files opened by the client: ``(name, fd, size)``; :meth:`close` them."""

    dataset: Path
    is_dir: bool
    files: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def fds(self) -> list[int]:
        return [fd for _, fd, _ in self.files]

    def describe(self) -> list[dict[str, Any]]:
        """The ``files`` field of the ``host`` request."""
        return [{"name": name, "size": size} for name, _, size in self.files]

    def close(self) -> None:
        for _, fd, _ in self.files:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.files = []


def _open_regular(path: Path) -> tuple[int, int]:
    """Open ``path`` read-only with this process's permissions; (fd, size). InputError if
    it cannot be read or is not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except PermissionError:
        raise InputError(f"{path}: permission denied (you cannot read it, so you cannot host it)",
                         field="dataset") from None
    except FileNotFoundError:
        raise InputError(f"{path}: no such file or directory", field="dataset") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot open: {exc.strerror or exc}", field="dataset") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"{path}: not a regular file", field="dataset")
    os.set_blocking(fd, True)
    return fd, st.st_size


def can_hand_over(path: Path) -> bool:
    """Whether ``crowdd host`` hands this dataset's files over: a file, or a directory of IDX
    files. Another directory (an image folder) goes by its path: the daemon reads it."""
    if not path.is_dir():
        return True
    try:
        return any(IDX_NAME.fullmatch(e.name) for e in os.scandir(path))
    except PermissionError:
        return True  # open_dataset says: permission denied


def open_dataset(path: Path) -> OpenFiles:
    """Open the dataset at ``path`` (a file, or a directory of IDX files) for handing over."""
    path = Path(path)
    opened = OpenFiles(path, path.is_dir())
    try:
        if opened.is_dir:
            try:
                names = sorted(e.name for e in os.scandir(path) if IDX_NAME.fullmatch(e.name))
            except PermissionError:
                raise InputError(f"{path}: permission denied (you cannot read it, so you cannot host it)",
                                 field="dataset") from None
            if not names:
                raise InputError(f"{path}: no IDX files in this directory (expected train-images-idx3-ubyte[.gz] "
                                 "and the like)", field="dataset")
            for name in names[:MAX_FILES]:
                fd, size = _open_regular(path / name)
                opened.files.append((name, fd, size))
        else:
            name = path.name if _NAME.fullmatch(path.name) else "dataset" + "".join(path.suffixes[-2:])
            fd, size = _open_regular(path)
            opened.files.append((check_name(name, "dataset"), fd, size))
    except BaseException:
        opened.close()
        raise
    return opened


def send(sock: socket.socket, fds: Sequence[int]) -> None:
    """Send the descriptors (one message, one byte) on a connected Unix stream socket."""
    socket.send_fds(sock, [MARK], list(fds))


# --------------------------------------------------------------------------- the daemon side


def receive(sock: socket.socket, count: int) -> list[int]:
    """The descriptors of one :func:`send`, exactly ``count`` of them, each a regular file.
    Raises InputError (and closes whatever came) otherwise; OSError/TimeoutError from the socket."""
    data, fds, flags, _ = socket.recv_fds(sock, 1, count + 1)
    try:
        if data != MARK:
            raise InputError("the client sent no files (expected one byte carrying them)", field="files")
        if flags & getattr(socket, "MSG_CTRUNC", 0) or len(fds) != count:
            raise InputError(f"expected {count} open file(s), got {len(fds)}", field="files")
        for fd in fds:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InputError("a handed file is not a regular file", field="files")
            if not _readable(fd):
                raise InputError("a handed file is not open for reading", field="files")
    except BaseException:
        close_all(fds)
        raise
    return list(fds)


def _readable(fd: int) -> bool:
    import fcntl  # POSIX only, as SCM_RIGHTS

    return (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE) in (os.O_RDONLY, os.O_RDWR)


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass
class Upload:
    """Files a client handed over: ``names[i]`` is open as ``fds[i]``; ``is_dir`` when they
    are a directory's IDX files. The daemon :meth:`copy_into` its cache, then :meth:`close`."""

    names: list[str]
    fds: list[int]
    sizes: list[int]

    @property
    def is_dir(self) -> bool:
        """IDX files form a directory; anything else is one file."""
        return all(IDX_NAME.fullmatch(n) for n in self.names)

    def total(self) -> int:
        return sum(self.sizes)

    def copy_into(self, directory: Path, *, max_bytes: int | None = None) -> Path:
        """Copy the files into ``directory`` (made here, 0700); the path of the dataset they
        form (the file, or ``directory`` for IDX files). Each file is copied from its start and
        must be the size the client announced (a file changing under us is refused)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        copied = 0
        for name, fd, size in zip(self.names, self.fds, self.sizes):
            dest = directory / name
            with os.fdopen(os.dup(fd), "rb") as src, dest.open("wb") as out:
                src.seek(0)
                done = 0
                while chunk := src.read(1 << 20):
                    done += len(chunk)
                    copied += len(chunk)
                    if max_bytes is not None and copied > max_bytes:
                        raise InputError(f"the dataset is larger than this node may keep ({max_bytes:,} bytes; "
                                         "[limits] disk_max_gb)", field="dataset")
                    out.write(chunk)
            if done != size:
                raise InputError(f"{name}: changed while it was handed over ({size:,} bytes announced, "
                                 f"{done:,} read)", field="dataset")
        return directory if self.is_dir else directory / self.names[0]

    def close(self) -> None:
        close_all(self.fds)
        self.fds = []


def remove_staging(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


__all__ = ["IDX_NAME", "MARK", "MAX_FILES", "OpenFiles", "Upload", "can_hand_over", "check_name", "close_all", "open_dataset",
           "receive", "remove_staging", "send"]

"""The system calls a job may not make (seccomp, through libseccomp's ``pyseccomp``).

Landlock (:mod:`crowdd.platform.sandbox`) decides which files and TCP ports a job reaches;
below Landlock ABI 9 it does not mediate pathname Unix sockets, so a graph could connect to
the session D-Bus or ``systemd --user`` (``systemd-run --user`` runs anything outside every
sandbox), ssh-agent, X11 or docker, all through a gRPC ``unix:`` target. This filter takes the
door away:

- ``socket(AF_UNIX, …)`` fails with ``EPERM`` (a job needs none: it reaches its relay over
  TCP on loopback; ``socketpair`` stays, it reaches nothing);
- ``io_uring_setup``/``io_uring_enter``/``io_uring_register`` fail with ``EPERM`` (io_uring
  opens sockets without the ``socket`` system call);
- ``setsid``/``setpgid`` fail with ``EPERM``: no process of the job leaves its session or
  process group (its PID namespace and cgroup hold it anyway; the job starts its servers in its
  own group);
- a system call of another architecture (a 32-bit one on x86-64) kills the process.

:func:`compile_filter` runs in the launcher (libseccomp allocates); :class:`Filter.install`
runs in the forked child before ``exec`` (one ``prctl``; ``no_new_privs`` is already set by
the sandbox). The filter is inherited by everything the job starts, across ``exec``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import socket
import tempfile

logger = logging.getLogger(__name__)

DENIED = ("io_uring_setup", "io_uring_enter", "io_uring_register", "setsid", "setpgid")
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class SyscallFilterError(Exception):
    """The filter could not be made or installed; the message is for the user."""


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Filter:
    """A compiled BPF program, held in memory this process owns until it execs."""

    def __init__(self, bpf: bytes) -> None:
        if not bpf or len(bpf) % 8:
            raise SyscallFilterError(f"libseccomp gave a malformed program ({len(bpf)} bytes)")
        self._buf = ctypes.create_string_buffer(bpf, len(bpf))
        self._prog = _SockFprog(len(bpf) // 8, ctypes.cast(self._buf, ctypes.c_void_p))
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.instructions = len(bpf) // 8

    def install(self) -> None:
        """Load the filter on the calling thread (only system calls: safe between fork and
        exec). Needs ``no_new_privs`` (or ``CAP_SYS_ADMIN``)."""
        if self._libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(self._prog), 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot install the job's syscall filter: {os.strerror(err)}")


def compile_filter() -> Filter:
    """The job's filter, compiled by libseccomp (raises :class:`SyscallFilterError`)."""
    try:
        import pyseccomp as seccomp
    except (ImportError, RuntimeError, OSError) as exc:  # RuntimeError: no libseccomp.so
        raise SyscallFilterError(f"cannot load libseccomp: {exc}") from None
    try:
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        f.add_rule(seccomp.ERRNO(errno.EPERM), "socket", seccomp.Arg(0, seccomp.EQ, socket.AF_UNIX))
        for name in DENIED:
            f.add_rule(seccomp.ERRNO(errno.EPERM), name)
        with tempfile.TemporaryFile() as out:
            f.export_bpf(out)
            out.seek(0)
            bpf = out.read()
    except (OSError, RuntimeError, ValueError) as exc:
        raise SyscallFilterError(f"cannot compile the job's syscall filter: {exc}") from None
    return Filter(bpf)


__all__ = ["DENIED", "Filter", "SyscallFilterError", "compile_filter"]

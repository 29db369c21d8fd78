"""Confining a job to a private network namespace (Linux, unprivileged user namespaces).

A TensorFlow server runs any graph it is sent and binds 0.0.0.0, so crowdd never lets one
face the network: the job runs in a new user + network namespace (``unshare --user
--map-root-user --net``), where 0.0.0.0 is that namespace's own loopback. Inside, the mapped
root brings ``lo`` up (:func:`loopback_up`) and the job reaches the group only through
path-based Unix sockets, which cross network namespaces (:mod:`crowdd.job.confine`).

:func:`probe` finds out once whether this machine allows it (not Linux, no ``unshare``, or
unprivileged user namespaces disabled, e.g. Ubuntu 24.04's AppArmor restriction, or a
service sandbox with ``RestrictNamespaces=``) and says why not.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

#: a new user, network and PID namespace; the relay is the PID namespace's init, so when it
#: dies (``--kill-child``: when ``unshare`` does) every process of the job dies with it, however
#: it left the job's process group (``setsid``, a double fork)
UNSHARE = ("unshare", "--user", "--map-root-user", "--net", "--pid", "--kill-child", "--")
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = struct.Struct("16sH14x")
PROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class Confinement:
    """Whether jobs can be confined here, and if not, why (for status and the TUI)."""

    available: bool
    reason: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"confined": self.available, "reason": self.reason}


def loopback_up() -> None:
    """Bring ``lo`` up in this (new) network namespace; needs CAP_NET_ADMIN there (the
    mapped root of the namespace's owning user namespace has it). Raises OSError."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = _IFREQ.pack(b"lo", 0)
        flags = _IFREQ.unpack(fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


def confined(argv: Sequence[str]) -> list[str]:
    """``argv`` run in a new user + network + PID namespace."""
    return [*UNSHARE, *argv]


_PROBE = (
    "import socket\n"
    "from crowdd.platform.userns import loopback_up\n"
    "loopback_up()\n"
    "s = socket.create_server(('127.0.0.1', 0)); c = socket.create_connection(s.getsockname(), timeout=5)\n"
    "print('ok')\n"
)


def probe_now(python: str = sys.executable) -> Confinement:
    """Try it: a child in a new user + network namespace brings ``lo`` up and talks to itself."""
    if not sys.platform.startswith("linux"):
        return Confinement(False, f"jobs can only be confined on Linux (this is {sys.platform})")
    if shutil.which(UNSHARE[0]) is None:
        return Confinement(False, "the unshare command (util-linux) is missing")
    try:
        done = subprocess.run(confined([python, "-c", _PROBE]), capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Confinement(False, f"cannot start a confined process: {exc}")
    if done.returncode != 0 or done.stdout.strip() != "ok":
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return Confinement(False, f"unprivileged user and network namespaces are not allowed here ({why})")
    return Confinement(True)


@functools.cache
def probe(python: str = sys.executable) -> Confinement:
    """:func:`probe_now`, once per process."""
    result = probe_now(python)
    if not result.available:
        logger.warning("TensorFlow cannot be confined on this machine: %s", result.reason)
    return result


def peer_pid(sock: Any) -> int | None:
    """The pid of the process at the other end of a Unix stream socket (Linux: SO_PEERCRED)."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i")))
    except OSError:
        return None
    return pid or None


#: ``SO_PEERPIDFD`` (Linux 6.5): a pidfd of the peer, which no later process can reuse
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


def why_not_served(sock: Any) -> str | None:
    """Why the process at the other end of Unix socket ``sock`` may not use the daemon (None:
    it may). A confined job lives in another user namespace; a peer of this user whose namespace
    cannot be read is refused too (it is gone, or its pid now names another process). A process
    of another user is never one of our jobs (they run as this user), whether or not its
    namespaces are ours to see. Fails open only where the platform has no peer credentials
    (not Linux)."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    try:
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i")))
    except OSError as exc:
        return f"its credentials cannot be read ({exc.strerror})"
    pidfd = -1
    with contextlib.suppress(OSError):
        pidfd = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    try:
        try:
            theirs = os.readlink(f"/proc/{pid}/ns/user")
        except OSError:
            # a job runs as this daemon's user: another user's process (hidden from us, or not
            # ours to inspect: a service's ProtectProc=invisible) is never one of its jobs
            return None if uid != os.getuid() else "it is gone (its user namespace cannot be read)"
        if pidfd >= 0:  # the pid still names the peer (not a process started since with its pid)
            try:
                signal.pidfd_send_signal(pidfd, 0)
            except ProcessLookupError:
                return "it is gone"
            except OSError:
                pass
        if theirs != os.readlink("/proc/self/ns/user"):
            return "it runs in another user namespace (a job?)"
        return None
    finally:
        if pidfd >= 0:
            os.close(pidfd)


__all__ = ["Confinement", "confined", "loopback_up", "peer_pid", "probe", "probe_now",
           "why_not_served"]

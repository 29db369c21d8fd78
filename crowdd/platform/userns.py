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
import ctypes
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
#: the same, with mount and UTS namespaces too: the job's private view of the machine
#: (:func:`private_view`) where they may be made (not under the system unit's
#: ``RestrictNamespaces=user net pid``, whose ``ProtectProc=invisible`` hides the other users'
#: processes instead)
UNSHARE_VIEW = ("unshare", "--user", "--map-root-user", "--net", "--pid", "--mount", "--uts", "--kill-child", "--")
#: what a job sees as this machine's users and groups, and its name
JOB_PASSWD = "root:x:0:0:root:/:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/:/usr/sbin/nologin\n"
JOB_GROUP = "root:x:0:\nnogroup:x:65534:\n"
JOB_HOSTNAME = "crowdd-job"
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x40000
_MNT_DETACH = 0x2
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
    #: a private view of the machine too (:func:`private_view`); if not, why
    private_view: bool = False
    view_reason: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"confined": self.available, "reason": self.reason}


def loopback_up() -> None:
    """Bring ``lo`` up in this (new) network namespace; needs CAP_NET_ADMIN there (the
    mapped root of the namespace's owning user namespace has it). Raises OSError."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = _IFREQ.pack(b"lo", 0)
        flags = _IFREQ.unpack(fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


def confined(argv: Sequence[str], *, private_view: bool = False) -> list[str]:
    """``argv`` run in a new user + network + PID namespace (``private_view``: mount and UTS
    namespaces too)."""
    return [*(UNSHARE_VIEW if private_view else UNSHARE), *argv]


def private_view(scratch: str) -> list[str]:
    """In fresh mount, UTS and PID namespaces, as their mapped root (the job's relay, before
    the sandbox): the job's view of the machine becomes its own. Its mounts stop propagating;
    ``/proc`` is this PID namespace's own (no other process of the machine, no command line,
    no environment of the volunteer's programs); the host name is :data:`JOB_HOSTNAME`;
    ``/etc/passwd`` and ``/etc/group`` name only root and nobody (no user names). Returns what
    could not be done (the caller logs it; the job still runs, as under the system unit).
    ``scratch``: an empty directory of the caller's; a tmpfs there holds the two files, detached
    once they cover the originals (outside the namespace it stays an empty directory)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source: str, target: str, fstype: str | None, flags: int) -> str | None:
        if libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags, None) != 0:
            return os.strerror(ctypes.get_errno())
        return None

    problems = []
    if (why := mount("none", "/", None, _MS_REC | _MS_PRIVATE)) is not None:
        return [f"cannot make the job's mounts private: {why}"]
    if (why := mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)) is not None:
        problems.append(f"cannot give the job a /proc of its own: {why}")
    if libc.sethostname(JOB_HOSTNAME.encode(), len(JOB_HOSTNAME)) != 0:
        problems.append(f"cannot name the job's host: {os.strerror(ctypes.get_errno())}")
    if (why := mount("tmpfs", scratch, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)) is not None:
        return [*problems, f"cannot cover /etc/passwd and /etc/group: {why}"]
    try:
        for target, text in (("/etc/passwd", JOB_PASSWD), ("/etc/group", JOB_GROUP)):
            if not os.path.exists(target):
                continue
            source = os.path.join(scratch, os.path.basename(target))
            with open(source, "w") as fh:
                fh.write(text)
            if (why := mount(source, target, None, _MS_BIND)) is not None:
                problems.append(f"cannot cover {target}: {why}")
    finally:
        libc.umount2(scratch.encode(), _MNT_DETACH)
    return problems


_PROBE_VIEW = (
    "import sys\n"
    "import os, tempfile\n"
    "from crowdd.platform.userns import private_view\n"
    "scratch = tempfile.mkdtemp(prefix='crowdd-view-')\n"
    "try:\n"
    "    problems = private_view(scratch)\n"
    "finally:\n"
    "    os.rmdir(scratch)\n"
    "print('; '.join(problems) or 'ok')\n"
    "sys.stderr.write('; '.join(problems))\n"
)
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
    try:
        view = subprocess.run(confined([python, "-c", _PROBE_VIEW], private_view=True), capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Confinement(True, view_reason=f"cannot start a process with a private view: {exc}")
    if view.returncode != 0 or view.stdout.strip() != "ok":
        why = (view.stderr.strip().splitlines() or [f"exit code {view.returncode}"])[-1]
        return Confinement(True, view_reason=f"no private view of the machine for jobs here ({why})")
    return Confinement(True, private_view=True)


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

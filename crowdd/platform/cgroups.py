"""A cgroup per job: caps the kernel enforces, and a kill that reaches every process.

Without one, the memory cap (``[job] max_memory_mb``) is a poll of the job's processes every
second: between two polls a graph allocates as fast as the machine lets it, and a process that
left the job's process group (``setsid``, a double fork) has to be tracked down. A cgroup of the
job's own closes both: the kernel holds the job's memory under ``memory.max`` (it reclaims,
then OOM-kills inside the job, never outside), refuses forks past ``pids.max``, and keeps every
process the job starts inside whatever it does, so the daemon lists and kills them all.

Where: a child of the daemon's own cgroup, in a hierarchy with both the ``memory`` and ``pids``
controllers that the daemon may write:

- cgroup v2 (the unified hierarchy): only where the daemon's cgroup is delegated to it (a unit
  with ``Delegate=yes``: systemd hands the directory to the unit's user, or marks it with the
  ``trusted.delegate`` attribute). A v2 cgroup that holds processes cannot give controllers to
  its children, so the daemon first moves its own processes into a leaf, ``daemon``.
- cgroup v1 (the ``memory`` and ``pids`` hierarchies): a child directory in each.

Where neither can be had, :meth:`JobCgroups.find` raises :class:`CgroupUnavailable` saying why,
and the supervisor keeps the poll. Each job's cgroup is removed when the job has ended; one
left by a daemon that died is removed at the next start (:meth:`JobCgroups.sweep`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: tasks (processes and threads) one job may have: TF's thread pools and gRPC's threads, for a
#: host's coordinator, its trainer and a relay, stay far below it; a fork bomb stops there
PIDS_MAX = 4096
PREFIX = "crowdd-job-"
CONTROLLERS = ("memory", "pids")
LEAF = "daemon"


class CgroupUnavailable(Exception):
    """No cgroup can be made for jobs here; the message says why."""


@dataclass(frozen=True)
class Mount:
    point: Path
    root: str
    fstype: str
    options: frozenset[str]


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup mounts listed in ``/proc/self/mountinfo``."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 5 or len(fields) < sep + 4 or fields[sep + 1] not in ("cgroup", "cgroup2"):
            continue
        out.append(Mount(Path(_unescape(fields[4])), _unescape(fields[3]), fields[sep + 1],
                         frozenset(fields[sep + 3].split(","))))
    return out


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as {controller: path}; the v2 entry under ``""``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            out[""] = path
        for c in controllers.split(","):
            if c:
                out[c] = path
    return out


def _below(mount: Mount, path: str) -> Path:
    rel = os.path.relpath(path, mount.root) if mount.root != "/" else path.lstrip("/")
    if rel.startswith(".."):
        raise CgroupUnavailable(f"the daemon's cgroup {path} is outside the mounted {mount.point}")
    return mount.point / ("" if rel == "." else rel)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _delegated(d: Path) -> bool:
    """Whether this v2 cgroup is the daemon's to divide: handed to its user, or marked."""
    if os.geteuid() != 0 and os.stat(d).st_uid == os.geteuid():
        return True
    for name in ("trusted.delegate", "user.delegate"):
        with contextlib.suppress(OSError):
            if os.getxattr(d, name) == b"1":
                return True
    return False


class JobCgroup:
    """One job's cgroup: one directory (v2) or one per hierarchy (v1)."""

    def __init__(self, dirs: tuple[Path, ...], version: int, memory_bytes: int) -> None:
        self.dirs = dirs
        self.version = version
        self.memory_bytes = memory_bytes

    @property
    def procs_files(self) -> tuple[str, ...]:
        """Where a process writes its pid to join (the job's first process, before it execs)."""
        return tuple(str(d / "cgroup.procs") for d in self.dirs)

    def pids(self) -> set[int]:
        out: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                out.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return out

    def _memory(self, v1: str, v2: str) -> str:
        return (self.dirs[0] / (v2 if self.version == 2 else v1)).read_text()

    def oom_kills(self) -> int:
        """How many of the job's processes the kernel killed at its memory cap."""
        with contextlib.suppress(OSError, ValueError):
            for line in self._memory("memory.oom_control", "memory.events").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def peak_mb(self) -> float:
        """The most memory the job held at once, in MB (0 where the kernel does not say)."""
        with contextlib.suppress(OSError, ValueError):
            return int(self._memory("memory.max_usage_in_bytes", "memory.peak").strip()) / 2**20
        return 0.0

    def kill(self) -> None:
        """SIGKILL every process in the job's cgroup, those that are still forking included."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                _write(self.dirs[0] / "cgroup.kill", "1")
        for _ in range(50):
            left = self.pids()
            if not left:
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def remove(self, wait: float = 5.0) -> bool:
        """Remove the cgroup once its processes are gone (kill them first); returns whether it
        is gone."""
        deadline = time.monotonic() + wait
        for d in self.dirs:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        logger.warning("cannot remove the job's cgroup %s: %s", d, exc)
                        return False
                    time.sleep(0.05)
        return True


class JobCgroups:
    """Where this daemon makes its jobs' cgroups (found once, at start)."""

    def __init__(self, bases: tuple[Path, ...], version: int) -> None:
        self.bases = bases
        self.version = version

    @classmethod
    def find(cls, *, proc: Path = Path("/proc/self")) -> JobCgroups:
        """The daemon's own cgroup(s), made ready for job children; raises
        :class:`CgroupUnavailable`."""
        try:
            mounts = parse_mountinfo((proc / "mountinfo").read_text())
            own = parse_proc_cgroup((proc / "cgroup").read_text())
        except OSError as exc:
            raise CgroupUnavailable(f"cannot read this process's cgroups: {exc}") from None
        reasons = []
        v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
        if v2 is not None and "" in own:
            try:
                return cls._v2(_below(v2, own[""]))
            except CgroupUnavailable as exc:
                reasons.append(str(exc))
        dirs = []
        for c in CONTROLLERS:
            m = next((m for m in mounts if m.fstype == "cgroup" and c in m.options), None)
            if m is None or c not in own:
                reasons.append(f"no cgroup v1 {c} hierarchy")
                break
            dirs.append(_below(m, own[c]))
        else:
            if all(os.access(d, os.W_OK) for d in dirs):
                return cls(tuple(dirs), 1)
            reasons.append(f"cgroup v1: this daemon may not write {' or '.join(str(d) for d in dirs)}")
        raise CgroupUnavailable("; ".join(reasons))

    @classmethod
    def _v2(cls, own: Path) -> JobCgroups:
        base = own.parent if own.name == LEAF and (own.parent / "cgroup.subtree_control").is_file() else own
        try:
            available = set((base / "cgroup.controllers").read_text().split())
            enabled = set((base / "cgroup.subtree_control").read_text().split())
        except OSError as exc:
            raise CgroupUnavailable(f"cgroup v2: cannot read {base}: {exc}") from None
        missing = [c for c in CONTROLLERS if c not in available]
        if missing:
            raise CgroupUnavailable(f"cgroup v2: {base} has no {', '.join(missing)} controller")
        if set(CONTROLLERS) <= enabled:
            return cls((base,), 2)
        if not _delegated(base):
            raise CgroupUnavailable(f"cgroup v2: {base} is not delegated to this daemon (Delegate=yes)")
        try:
            procs = (base / "cgroup.procs").read_text().split()
            if procs:  # no processes where controllers are given to children: into a leaf
                leaf = base / LEAF
                leaf.mkdir(exist_ok=True)
                for pid in procs:
                    with contextlib.suppress(ProcessLookupError):
                        _write(leaf / "cgroup.procs", pid)
            _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
        except OSError as exc:
            raise CgroupUnavailable(f"cgroup v2: cannot give {base} the memory and pids controllers: {exc}") from None
        return cls((base,), 2)

    def create(self, name: str, memory_mb: int, pids_max: int = PIDS_MAX) -> JobCgroup:
        """A new job's cgroup ``crowdd-job-<daemon pid>-<name>`` with its caps (``memory_mb``
        0: no memory cap); raises :class:`CgroupUnavailable`."""
        leaf = f"{PREFIX}{os.getpid()}-{name}"
        dirs = tuple(b / leaf for b in self.bases)
        cg = JobCgroup(dirs, self.version, memory_mb * 2**20)
        try:
            for d in dirs:
                d.mkdir(exist_ok=True)
            self._limit(cg, pids_max)
        except OSError as exc:
            cg.remove(wait=0)
            raise CgroupUnavailable(f"cannot set up the job's cgroup {dirs[0]}: {exc}") from None
        return cg

    def _limit(self, cg: JobCgroup, pids_max: int) -> None:
        mem = cg.dirs[0]
        pids = cg.dirs[-1]
        if self.version == 2:
            if cg.memory_bytes:
                _write(mem / "memory.max", str(cg.memory_bytes))
                if (mem / "memory.swap.max").exists():  # swap would let it past the cap
                    _write(mem / "memory.swap.max", "0")
        elif cg.memory_bytes:
            _write(mem / "memory.limit_in_bytes", str(cg.memory_bytes))
            if (mem / "memory.memsw.limit_in_bytes").exists():
                _write(mem / "memory.memsw.limit_in_bytes", str(cg.memory_bytes))
        _write(pids / "pids.max", str(pids_max))

    def sweep(self) -> list[Path]:
        """Remove the job cgroups that daemons no longer running left behind (empty ones
        only); returns those removed."""
        removed = []
        for base in self.bases:
            for d in _stale(base.glob(f"{PREFIX}*")):
                with contextlib.suppress(OSError):
                    d.rmdir()
                    removed.append(d)
        return removed


def _stale(dirs: Iterable[Path]) -> list[Path]:
    out = []
    for d in dirs:
        owner = d.name[len(PREFIX):].split("-", 1)[0]
        if not owner.isdigit() or int(owner) == os.getpid():
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            out.append(d)
        except PermissionError:
            continue
    return out


__all__ = ["PIDS_MAX", "PREFIX", "CgroupUnavailable", "JobCgroup", "JobCgroups", "parse_mountinfo", "parse_proc_cgroup"]

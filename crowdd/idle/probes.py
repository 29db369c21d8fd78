"""What the idle policy measures: user idleness, other processes' CPU use, the battery.

The readings are plain values; :class:`Probes` bundles the three callables the policy asks.
:func:`system_probes` builds the real ones: logind's IdleHint/IdleSinceHint through
``loginctl`` (a system service cannot see X11/Wayland input itself), psutil for CPU (every
process but crowdd's own tree) and for the battery.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UserIdle:
    """Seconds the user has been idle (``math.inf``: nobody there), or None: no signal."""

    idle_seconds: float | None
    detail: str


@dataclass(frozen=True)
class CpuReading:
    """A cumulative counter: CPU-seconds used by other processes since some fixed start."""

    when: float  # monotonic seconds
    other_seconds: float
    ncpu: int


@dataclass(frozen=True)
class BatteryReading:
    percent: float
    plugged: bool | None  # None: the platform cannot tell


@dataclass(frozen=True)
class Probes:
    user_idle: Callable[[], UserIdle]
    cpu: Callable[[], CpuReading | None]
    battery: Callable[[], BatteryReading | None]  # None: no battery


Runner = Callable[[list[str], float], "subprocess.CompletedProcess[str]"]


def run_command(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


_GRAPHICAL = ("x11", "wayland", "mir")


def parse_sessions(text: str) -> list[dict[str, str]]:
    """``loginctl show-session -p ... ID...`` output (blocks split by blank lines) → dicts."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition("=")
        if sep:
            current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def user_idle_from_sessions(sessions: list[dict[str, str]], now: float) -> UserIdle:
    """Decide from logind's session properties: any active user session not idle → 0 s."""
    relevant = [s for s in sessions if s.get("Class", "user") == "user" and s.get("Active", "yes") == "yes"]
    if not relevant:
        return UserIdle(math.inf, "logind: no active user sessions")
    idle_since: list[float] = []
    silent: list[str] = []
    for s in relevant:
        sid = s.get("Id", "?")
        hint = s.get("IdleHint", "no") == "yes"
        try:
            since_us = int(s.get("IdleSinceHint", "0") or 0)
        except ValueError:
            since_us = 0
        if not hint and since_us == 0 and s.get("Type", "") in _GRAPHICAL:
            silent.append(sid)  # a desktop that never reports idleness to logind
            continue
        if not hint:
            return UserIdle(0.0, f"logind: session {sid} is in use")
        idle_since.append(since_us / 1e6 if since_us else -math.inf)
    if not idle_since:
        return UserIdle(None, f"logind: graphical session {', '.join(silent)} never set IdleHint (its desktop does not report idleness)")
    latest = max(idle_since)
    seconds = math.inf if latest == -math.inf else max(0.0, now - latest)
    note = f"; session {', '.join(silent)} reports nothing" if silent else ""
    return UserIdle(seconds, f"logind{note}")


class LogindIdle:
    """User idleness from logind through ``loginctl`` (bounded by a timeout)."""

    def __init__(self, run: Runner = run_command, clock: Callable[[], float] = time.time, timeout: float = 3.0) -> None:
        self._run = run
        self._clock = clock
        self._timeout = timeout

    def _call(self, argv: list[str]) -> tuple[str | None, str]:
        try:
            proc = self._run(argv, self._timeout)
        except FileNotFoundError:
            return None, "loginctl not found (no systemd-logind)"
        except subprocess.TimeoutExpired:
            return None, f"loginctl timed out after {self._timeout:g}s"
        except OSError as exc:
            return None, f"loginctl failed: {exc}"
        if proc.returncode != 0:
            msg = " ".join((proc.stderr or proc.stdout or "").split()) or f"exit status {proc.returncode}"
            return None, f"logind unavailable: {msg}"
        return proc.stdout, ""

    def __call__(self) -> UserIdle:
        out, why = self._call(["loginctl", "list-sessions", "--no-legend", "--no-pager"])
        if out is None:
            return UserIdle(None, why)
        ids = [line.split()[0] for line in out.splitlines() if line.split()]
        if not ids:
            return UserIdle(math.inf, "logind: no user sessions")
        props = ["Id", "Class", "Type", "Active", "IdleHint", "IdleSinceHint"]
        argv = ["loginctl", "show-session", "--no-pager"] + [f"--property={p}" for p in props] + ids
        out, why = self._call(argv)
        if out is None:
            return UserIdle(None, why)
        return user_idle_from_sessions(parse_sessions(out), self._clock())


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    total = sum(t)
    # on Linux guest time is already counted in user/nice
    total -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    return total - t.idle - getattr(t, "iowait", 0.0)


def _tree_times(root_pid: int) -> dict[int, float]:
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    out: dict[int, float] = {}
    for p in procs:
        try:
            ct = p.cpu_times()
            out[p.pid] = ct.user + ct.system
        except psutil.Error:
            continue
    return out


class OtherCpu:
    """Cumulative CPU-seconds used by every process but ``exclude_root``'s tree.

    Each call reads the machine's busy time and subtracts what crowdd's own tree (the daemon and
    its job child) used since the previous call, tracked per process so exits and new children
    do not skew it. ``busy`` and ``tree`` are injectable for tests.
    """

    def __init__(
        self,
        exclude_root: int,
        *,
        busy: Callable[[], float] = _busy_seconds,
        tree: Callable[[int], dict[int, float]] = _tree_times,
        ncpu: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = exclude_root
        self._busy = busy
        self._tree = tree
        self._ncpu = ncpu or psutil.cpu_count() or 1
        self._clock = clock
        self._last: dict[int, float] | None = None
        self._own = 0.0
        self._base_busy: float | None = None

    def __call__(self) -> CpuReading:
        busy = self._busy()
        times = self._tree(self._root)
        if self._last is None or self._base_busy is None:
            self._base_busy = busy
        else:
            for pid, t in times.items():
                prev = self._last.get(pid)
                self._own += max(0.0, t - prev) if prev is not None else t
        self._last = times
        return CpuReading(self._clock(), max(0.0, busy - self._base_busy - self._own), self._ncpu)


def battery_reading() -> BatteryReading | None:
    try:
        b = psutil.sensors_battery()
    except (AttributeError, NotImplementedError, OSError):
        return None
    if b is None:
        return None
    return BatteryReading(float(b.percent), b.power_plugged)


def system_probes(exclude_root: int | None = None, *, loginctl_timeout: float = 3.0) -> Probes:
    """The real probes: logind, psutil CPU (excluding crowdd's tree, default this process) and battery."""
    return Probes(
        user_idle=LogindIdle(timeout=loginctl_timeout) if shutil.which("loginctl") else _no_logind,
        cpu=OtherCpu(os.getpid() if exclude_root is None else exclude_root),
        battery=battery_reading,
    )


def _no_logind() -> UserIdle:
    return UserIdle(None, "loginctl not found (no systemd-logind on this system)")


__all__ = [
    "BatteryReading",
    "CpuReading",
    "LogindIdle",
    "OtherCpu",
    "Probes",
    "UserIdle",
    "battery_reading",
    "parse_sessions",
    "system_probes",
    "user_idle_from_sessions",
]

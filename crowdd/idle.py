"""The idle policy: donate this machine only while its owner is not using it (SETI@home-style).

:class:`IdlePolicy` combines these rules, checked in this order; the first that fails holds
donation back and :class:`Verdict` names it:

``paused``
    the user asked for a break (:meth:`IdlePolicy.pause`, "pause for N hours").
``schedule``
    the time is outside ``idle.schedule`` (grammar below); an empty list means any time.
``battery``
    the machine runs on battery. After a battery stop, donation resumes only once the machine
    is on mains power *and* charged to ``idle.battery_resume_percent`` (hysteresis, so it does
    not flap). ``idle.allow_on_battery = true`` switches the rule off.
``user_idle``
    the user has been idle for ``idle.user_idle_minutes`` (0 = rule off). On Linux the signal is
    logind's IdleHint/IdleSinceHint of the active user sessions: a system service cannot see
    X11/Wayland input itself. Where there is no signal (no logind, or a desktop that never sets
    IdleHint) the rule is skipped, the next rule decides, and the verdict's reason says so.
``cpu``
    other processes (everything but crowdd's own process tree) used less than
    ``idle.max_other_cpu_percent`` of the machine's CPU over the last
    ``idle.cpu_window_seconds`` (100 = rule off).

``idle.on_busy`` (``suspend`` | ``leave``) travels in every verdict: what the daemon does when
the policy turns false mid-session. ``idle.tf_threads`` caps the CPU threads the job gives
TensorFlow (:attr:`IdlePolicy.tf_threads`, :func:`thread_env`).

Schedule grammar (one string per window; the windows are joined)::

    ENTRY  := [DAYS " "] RANGES            no DAYS = every day
    DAYS   := DAYSPEC ("," DAYSPEC)*       e.g. "mon-fri", "sat,sun", "fri-mon", "daily", "*"
    DAYSPEC:= DAY | DAY "-" DAY            DAY = mon tue wed thu fri sat sun (any case,
                                           full names accepted); a range may wrap past sunday
    RANGES := RANGE ("," RANGE)*
    RANGE  := HH:MM "-" HH:MM              00:00..23:59, and 24:00 as an end
An end at or before the start wraps past midnight: ``mon-fri 18:00-08:00`` runs from Monday
18:00 to Tuesday 08:00, ..., Friday 18:00 to Saturday 08:00 (the day names the start).
``sat,sun 00:00-24:00`` is the whole weekend. A start equal to its end is an error (say
``00:00-24:00`` for a whole day).

Every probe is injected (:class:`Probes`) so tests can drive each rule; :func:`system_probes`
builds the real ones (logind via ``loginctl``, psutil for CPU and battery).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import psutil

from crowdd.config import ConfigError, IdleConfig

logger = logging.getLogger(__name__)

ON_BUSY = ("suspend", "leave")
MAX_PAUSE_HOURS = 24 * 365
RULES = ("paused", "schedule", "battery", "user_idle", "cpu")


# --------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class Verdict:
    """May the daemon donate now? ``rule`` names the rule holding donation back (None if allowed)."""

    allowed: bool
    rule: str | None
    reason: str
    on_busy: str = "suspend"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- probe readings


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


# --------------------------------------------------------------------------- schedule


class ScheduleError(ValueError):
    """A schedule string that does not follow the grammar; the message says where and why."""


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday
    start: int  # minute of the day
    end: int  # minute of the day, 1..1440; end <= start wraps past midnight

    def contains(self, weekday: int, minute: int) -> bool:
        if self.end > self.start:
            return weekday in self.days and self.start <= minute < self.end
        return (weekday in self.days and minute >= self.start) or (
            (weekday - 1) % 7 in self.days and minute < self.end
        )


def _day(token: str, entry: str) -> int:
    t = token.strip().lower()
    if t in _DAYS:
        return _DAYS.index(t)
    if t in _FULL_DAYS:
        return _FULL_DAYS.index(t)
    raise ScheduleError(f"{entry!r}: unknown day {token!r} (use mon, tue, wed, thu, fri, sat, sun)")


def _days(spec: str, entry: str) -> frozenset[int]:
    if spec.lower() in ("daily", "*", "every"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in spec.split(","):
        if not part:
            raise ScheduleError(f"{entry!r}: empty day in {spec!r}")
        if "-" in part:
            a_s, _, b_s = part.partition("-")
            a, b = _day(a_s, entry), _day(b_s, entry)
            days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
        else:
            days.add(_day(part, entry))
    return frozenset(days)


def _minute(token: str, entry: str, *, is_end: bool) -> int:
    m = _TIME.match(token.strip())
    if not m:
        raise ScheduleError(f"{entry!r}: expected a time HH:MM, got {token!r}")
    h, mi = int(m.group(1)), int(m.group(2))
    if mi > 59 or h > 24 or (h == 24 and (mi or not is_end)):
        where = "an end" if is_end else "a start"
        limit = "00:00..24:00" if is_end else "00:00..23:59"
        raise ScheduleError(f"{entry!r}: {token!r} is not a valid time for {where} ({limit})")
    return h * 60 + mi


def parse_window(entry: str) -> list[Window]:
    """One schedule string → its windows (one per time range)."""
    if not isinstance(entry, str):
        raise ScheduleError(f"expected a string like 'mon-fri 18:00-08:00', got {entry!r}")
    parts = entry.split()
    if len(parts) == 1 and ":" in parts[0]:
        days, ranges = frozenset(range(7)), parts[0]
    elif len(parts) == 2:
        days, ranges = _days(parts[0], entry), parts[1]
    else:
        raise ScheduleError(f"{entry!r}: expected 'DAYS HH:MM-HH:MM', e.g. 'mon-fri 18:00-08:00' or 'sat,sun 00:00-24:00'")
    out = []
    for rng in ranges.split(","):
        start_s, sep, end_s = rng.partition("-")
        if not sep:
            raise ScheduleError(f"{entry!r}: expected a range HH:MM-HH:MM, got {rng!r}")
        start = _minute(start_s, entry, is_end=False)
        end = _minute(end_s, entry, is_end=True)
        if start == end or (start == 0 and end == 0):
            raise ScheduleError(f"{entry!r}: {rng!r} is empty (start equals end); use 00:00-24:00 for a whole day")
        out.append(Window(days, start, end))
    return out


def parse_schedule(entries: Iterable[str]) -> list[Window]:
    """All schedule strings → windows; raises :class:`ScheduleError` naming the bad entry."""
    windows: list[Window] = []
    for i, entry in enumerate(entries):
        try:
            windows.extend(parse_window(entry))
        except ScheduleError as exc:
            raise ScheduleError(f"[{i}] {exc}") from None
    return windows


class Schedule:
    """A weekly schedule; no windows = always inside."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.entries = list(entries)
        self.windows = parse_schedule(self.entries)

    def contains(self, when: datetime) -> bool:
        if not self.windows:
            return True
        minute = when.hour * 60 + when.minute
        return any(w.contains(when.weekday(), minute) for w in self.windows)

    def next_start(self, when: datetime) -> datetime | None:
        """The next moment after ``when`` that lies inside the schedule (minute resolution)."""
        if not self.windows:
            return None
        base = when.replace(second=0, microsecond=0)
        candidates = []
        for offset in range(8):
            day = base + timedelta(days=offset)
            midnight = day.replace(hour=0, minute=0)
            for w in self.windows:
                if day.weekday() in w.days:
                    start = midnight + timedelta(minutes=w.start)
                    if start > when:
                        candidates.append(start)
        return min(candidates) if candidates else None


# --------------------------------------------------------------------------- policy


class Policy(Protocol):
    """What the daemon needs from a policy (:class:`IdlePolicy` or :class:`AlwaysIdle`)."""

    def evaluate(self) -> Verdict: ...

    def pause(self, hours: float) -> None: ...

    def resume(self) -> None: ...

    @property
    def on_busy(self) -> str: ...

    @property
    def tf_threads(self) -> int: ...


def validate_idle_config(cfg: IdleConfig, source: str = "<config>") -> Schedule:
    """Check what :mod:`crowdd.config` does not; raises :class:`ConfigError` naming the key."""
    if cfg.on_busy not in ON_BUSY:
        raise ConfigError(source, "idle.on_busy", f"expected one of {', '.join(ON_BUSY)}, got {cfg.on_busy!r}")
    if not (math.isfinite(cfg.user_idle_minutes) and cfg.user_idle_minutes >= 0):
        raise ConfigError(source, "idle.user_idle_minutes", f"expected minutes >= 0 (0 = rule off), got {cfg.user_idle_minutes!r}")
    for key in ("max_other_cpu_percent", "battery_resume_percent"):
        value = getattr(cfg, key)
        if not (isinstance(value, (int, float)) and 0 <= value <= 100):
            raise ConfigError(source, f"idle.{key}", f"expected a percentage 0..100, got {value!r}")
    if not (math.isfinite(cfg.cpu_window_seconds) and cfg.cpu_window_seconds > 0):
        raise ConfigError(source, "idle.cpu_window_seconds", f"expected seconds > 0, got {cfg.cpu_window_seconds!r}")
    if isinstance(cfg.tf_threads, bool) or not isinstance(cfg.tf_threads, int) or cfg.tf_threads < 1:
        raise ConfigError(source, "idle.tf_threads", f"expected an integer >= 1, got {cfg.tf_threads!r}")
    if isinstance(cfg.schedule, str):
        raise ConfigError(source, "idle.schedule", f"expected a list of strings, got the string {cfg.schedule!r}")
    try:
        return Schedule(cfg.schedule)
    except ScheduleError as exc:
        raise ConfigError(source, "idle.schedule", str(exc)) from None


def _fmt_duration(seconds: float) -> str:
    if math.isinf(seconds):
        return "ever"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class IdlePolicy:
    """The SETI@home-style policy. ``clock`` gives wall-clock seconds (pause, schedule)."""

    def __init__(
        self,
        cfg: IdleConfig,
        probes: Probes,
        clock: Callable[[], float] = time.time,
        *,
        source: str = "<config>",
    ) -> None:
        self._probes = probes
        self._clock = clock
        self._paused_until: float | None = None
        self._battery_held = False
        self._cpu_history: deque[CpuReading] = deque()
        self.cfg = cfg
        self._schedule = validate_idle_config(cfg, source)

    def reconfigure(self, cfg: IdleConfig, *, source: str = "<config>") -> None:
        """New settings (on reload); keeps a running pause and the battery state."""
        self._schedule = validate_idle_config(cfg, source)
        self.cfg = cfg

    @property
    def on_busy(self) -> str:
        return self.cfg.on_busy

    @property
    def tf_threads(self) -> int:
        """The CPU threads the job may give TensorFlow (never more than the machine has)."""
        return max(1, min(self.cfg.tf_threads, os.cpu_count() or 1))

    @property
    def paused_until(self) -> float | None:
        if self._paused_until is not None and self._clock() >= self._paused_until:
            self._paused_until = None
        return self._paused_until

    def pause(self, hours: float) -> None:
        """Hold donation back for ``hours`` (> 0, at most a year)."""
        if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not math.isfinite(hours):
            raise ValueError(f"pause: expected a number of hours, got {hours!r}")
        if not 0 < hours <= MAX_PAUSE_HOURS:
            raise ValueError(f"pause: expected 0 < hours <= {MAX_PAUSE_HOURS}, got {hours!r}")
        self._paused_until = self._clock() + hours * 3600.0

    def resume(self) -> None:
        """End a pause early."""
        self._paused_until = None

    # -- rules: each returns None when it allows, else the reason it holds back

    def _check_paused(self, now: float) -> str | None:
        until = self.paused_until
        if until is None:
            return None
        at = datetime.fromtimestamp(until).strftime("%a %H:%M")
        return f"paused by the user until {at} ({_fmt_duration(until - now)} left)"

    def _check_schedule(self, now: float) -> str | None:
        when = datetime.fromtimestamp(now)
        if self._schedule.contains(when):
            return None
        nxt = self._schedule.next_start(when)
        tail = f"; next window starts {nxt.strftime('%a %H:%M')}" if nxt else ""
        return f"outside the schedule ({'; '.join(self._schedule.entries)}){tail}"

    def _check_battery(self) -> str | None:
        if self.cfg.allow_on_battery:
            self._battery_held = False
            return None
        reading = self._probes.battery()
        if reading is None:
            self._battery_held = False
            return None
        resume_at = self.cfg.battery_resume_percent
        if reading.plugged is False:
            self._battery_held = True
            return f"on battery ({reading.percent:.0f}%)"
        if reading.plugged is None:
            # cannot tell: keep the previous decision rather than flap
            if self._battery_held:
                return f"power source unknown after a battery stop ({reading.percent:.0f}%)"
            return None
        if self._battery_held and reading.percent < resume_at:
            return f"on mains power, charging: {reading.percent:.0f}% (resumes at {resume_at:.0f}%)"
        self._battery_held = False
        return None

    def _user_idle(self) -> tuple[str | None, str]:
        """(hold reason or None, note for the allowed/fallback reason)."""
        need = self.cfg.user_idle_minutes * 60.0
        if need <= 0:
            return None, ""
        reading = self._probes.user_idle()
        if reading.idle_seconds is None:
            return None, f"no user-idle signal ({reading.detail}), so other processes' CPU use decides"
        if reading.idle_seconds < need:
            idle_for, required = _fmt_duration(reading.idle_seconds), _fmt_duration(need)
            return f"user active: idle {idle_for} of the {required} required ({reading.detail})", ""
        return None, f"user idle {_fmt_duration(reading.idle_seconds)}"

    def _cpu_percent(self) -> tuple[float, float] | None:
        """(percent of the machine used by other processes, seconds covered) or None."""
        reading = self._probes.cpu()
        if reading is None:
            return None
        hist = self._cpu_history
        hist.append(reading)
        window = self.cfg.cpu_window_seconds
        # keep one reading at or before the window's start so the window is covered
        while len(hist) > 2 and hist[1].when <= reading.when - window:
            hist.popleft()
        first = hist[0]
        span = reading.when - first.when
        if span <= 0:
            return None
        used = max(0.0, reading.other_seconds - first.other_seconds)
        return min(100.0, 100.0 * used / (span * max(1, reading.ncpu))), span

    def _check_cpu(self, measured: tuple[float, float] | None) -> tuple[str | None, str]:
        limit = self.cfg.max_other_cpu_percent
        if limit >= 100:
            return None, ""
        if measured is None:
            return "measuring other processes' CPU use (needs a second reading)", ""
        pct, span = measured
        if pct > limit:
            return f"other processes use {pct:.0f}% CPU (limit {limit:.0f}%) over {_fmt_duration(span)}", ""
        return None, f"other CPU {pct:.0f}% <= {limit:.0f}%"

    def evaluate(self) -> Verdict:
        now = self._clock()
        on_busy = self.cfg.on_busy
        # sample CPU on every evaluation, even while another rule holds, so the window stays filled
        measured = self._cpu_percent() if self.cfg.max_other_cpu_percent < 100 else None

        def hold(rule: str, reason: str) -> Verdict:
            return Verdict(False, rule, reason, on_busy)

        if (why := self._check_paused(now)) is not None:
            return hold("paused", why)
        if (why := self._check_schedule(now)) is not None:
            return hold("schedule", why)
        if (why := self._check_battery()) is not None:
            return hold("battery", why)
        user_why, user_note = self._user_idle()
        if user_why is not None:
            return hold("user_idle", user_why)
        cpu_why, cpu_note = self._check_cpu(measured)
        if cpu_why is not None:
            return hold("cpu", f"{cpu_why}; {user_note}" if user_note.startswith("no user-idle") else cpu_why)
        notes = [n for n in (user_note, cpu_note) if n]
        if user_note.startswith("no user-idle") and not cpu_note:
            notes[0] = notes[0].replace("so other processes' CPU use decides", "and the CPU rule is off")
        return Verdict(True, None, "idle: " + ("; ".join(notes) if notes else "every rule allows"), on_busy)


class AlwaysIdle:
    """A policy that always allows (demo, tests); pause/resume still work."""

    def __init__(self, clock: Callable[[], float] = time.time, *, on_busy: str = "suspend", tf_threads: int = 1) -> None:
        self._clock = clock
        self._paused_until: float | None = None
        self._on_busy = on_busy
        self._tf_threads = tf_threads

    @property
    def on_busy(self) -> str:
        return self._on_busy

    @property
    def tf_threads(self) -> int:
        return self._tf_threads

    def pause(self, hours: float) -> None:
        if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not 0 < hours <= MAX_PAUSE_HOURS:
            raise ValueError(f"pause: expected 0 < hours <= {MAX_PAUSE_HOURS}, got {hours!r}")
        self._paused_until = self._clock() + hours * 3600.0

    def resume(self) -> None:
        self._paused_until = None

    def evaluate(self) -> Verdict:
        if self._paused_until is not None:
            left = self._paused_until - self._clock()
            if left > 0:
                return Verdict(False, "paused", f"paused by the user ({_fmt_duration(left)} left)", self._on_busy)
            self._paused_until = None
        return Verdict(True, None, "idle policy off: always donate", self._on_busy)


def thread_env(threads: int) -> dict[str, str]:
    """Environment for the job child that caps TensorFlow's (and BLAS's) CPU threads."""
    n = str(max(1, int(threads)))
    return {
        "TF_NUM_INTRAOP_THREADS": n,
        "TF_NUM_INTEROP_THREADS": n,
        "OMP_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
    }


# --------------------------------------------------------------------------- real probes

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


# --------------------------------------------------------------------------- suspend / resume


class JobSuspender:
    """Suspend and resume a process tree (SIGSTOP/SIGCONT on POSIX, NtSuspendProcess on Windows).

    ``suspend`` stops the root first (so it cannot start new children), then every descendant,
    and scans once more for children started meanwhile; ``resume`` continues what it stopped,
    children before the root.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._stopped: list[psutil.Process] = []

    @property
    def suspended(self) -> bool:
        return bool(self._stopped)

    def suspend(self) -> list[int]:
        """Stop the tree; returns the pids stopped. ProcessLookupError if the root is gone."""
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            raise ProcessLookupError(f"cannot suspend: no process {self.pid}") from None
        seen = {p.pid for p in self._stopped}
        todo = [root]
        for _ in range(2):  # second pass catches children forked while we were stopping
            try:
                todo += root.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            for p in todo:
                if p.pid in seen:
                    continue
                try:
                    p.suspend()
                except psutil.NoSuchProcess:
                    continue
                except psutil.AccessDenied:
                    raise PermissionError(f"cannot suspend process {p.pid}: access denied") from None
                seen.add(p.pid)
                self._stopped.append(p)
            todo = []
        logger.info("suspended job tree %d (%d processes)", self.pid, len(self._stopped))
        return [p.pid for p in self._stopped]

    def resume(self) -> list[int]:
        """Continue every process this suspender stopped; returns their pids."""
        resumed = []
        for p in reversed(self._stopped):
            try:
                if p.is_running():
                    p.resume()
                    resumed.append(p.pid)
            except psutil.NoSuchProcess:
                continue
            except psutil.AccessDenied:
                logger.warning("cannot resume process %d: access denied", p.pid)
        self._stopped = []
        logger.info("resumed job tree %d (%d processes)", self.pid, len(resumed))
        return resumed

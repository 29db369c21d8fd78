"""The idle policy: donate this machine only while its owner is not using it (SETI@home-style).

:class:`IdlePolicy` combines these rules, checked in this order; the first that fails holds
donation back and :class:`Verdict` names it:

``paused``
    the user asked for a break (:meth:`IdlePolicy.pause`, "pause for N hours").
``schedule``
    the time is outside ``idle.schedule`` (grammar: :mod:`crowdd.idle.schedule`); an empty list means any time.
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
    other processes (everything but crowdd's own process tree) use no more than
    ``idle.max_other_cpu_percent`` of the machine's CPU (100 = rule off). Each evaluation
    measures the stretch since the previous one (at least :data:`MIN_CPU_SPAN`; the daemon
    evaluates every second while it works, so a program that turns busy holds donation back
    within about a second). Hysteresis, so it does not flap: once other processes were busy,
    the rule holds until they have stayed under the limit for ``idle.cpu_window_seconds``.

``idle.on_busy`` (``suspend`` | ``leave``) travels in every verdict: what the daemon does when
the policy turns false mid-session. ``idle.tf_threads`` caps the CPU threads the job gives
TensorFlow (:attr:`IdlePolicy.tf_threads`, :func:`crowdd.platform.threads.thread_env`).

Every probe is injected (:class:`crowdd.idle.probes.Probes`) so tests can drive each rule;
:func:`crowdd.idle.probes.system_probes` builds the real ones.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from crowdd.config import ConfigError, IdleConfig
from crowdd.idle.probes import CpuReading, Probes
from crowdd.idle.schedule import Schedule, ScheduleError

logger = logging.getLogger(__name__)

ON_BUSY = ("suspend", "leave")
MAX_PAUSE_HOURS = 24 * 365
#: Seconds: CPU readings closer together than this say nothing (measured from an older one).
MIN_CPU_SPAN = 0.5
RULES = ("paused", "schedule", "battery", "user_idle", "cpu")


@dataclass(frozen=True)
class Verdict:
    """May the daemon donate now? ``rule`` names the rule holding donation back (None if allowed)."""

    allowed: bool
    rule: str | None
    reason: str
    on_busy: str = "suspend"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Policy(Protocol):
    """What the daemon needs from a policy (:class:`IdlePolicy` or :class:`AlwaysIdle`)."""

    def evaluate(self) -> Verdict: ...

    def pause(self, hours: float) -> None: ...

    def resume(self) -> None: ...

    @property
    def paused_until(self) -> float | None:
        """The end of the user's pause (``clock`` seconds), None when not paused."""
        ...

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
        self._cpu_recent: tuple[float, float] | None = None  # (percent, seconds) of the latest stretch
        self._cpu_busy_at: float | None = None  # probe time of the last stretch over the limit
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

    def _sample_cpu(self) -> float | None:
        """Read the CPU probe: note the latest stretch's percent (from the newest reading at least
        :data:`MIN_CPU_SPAN` older) and when other processes were last over the limit. Returns the
        reading's time, or None without a reading."""
        reading = self._probes.cpu()
        if reading is None:
            return None
        hist = self._cpu_history
        hist.append(reading)
        # keep what a stretch needs: the readings of the last MIN_CPU_SPAN and one before
        while len(hist) > 2 and hist[1].when <= reading.when - MIN_CPU_SPAN:
            hist.popleft()
        base = next((r for r in reversed(hist) if reading.when - r.when >= MIN_CPU_SPAN), None)
        if base is None:
            return reading.when
        span = reading.when - base.when
        used = max(0.0, reading.other_seconds - base.other_seconds)
        pct = min(100.0, 100.0 * used / (span * max(1, reading.ncpu)))
        self._cpu_recent = (pct, span)
        if pct > self.cfg.max_other_cpu_percent:
            self._cpu_busy_at = reading.when
        return reading.when

    def _check_cpu(self, when: float | None) -> tuple[str | None, str]:
        limit = self.cfg.max_other_cpu_percent
        if limit >= 100:
            return None, ""
        if when is None or self._cpu_recent is None:
            return "measuring other processes' CPU use (needs a second reading)", ""
        pct, span = self._cpu_recent
        if pct > limit:
            return f"other processes use {pct:.0f}% CPU (limit {limit:.0f}%) over {_fmt_duration(span)}", ""
        quiet = self.cfg.cpu_window_seconds
        if self._cpu_busy_at is not None and when - self._cpu_busy_at < quiet:
            ago = _fmt_duration(when - self._cpu_busy_at)
            return (f"other processes used more than {limit:.0f}% CPU {ago} ago (now {pct:.0f}%); "
                    f"waiting until they stay under it for {_fmt_duration(quiet)}"), ""
        return None, f"other CPU {pct:.0f}% <= {limit:.0f}%"

    def evaluate(self) -> Verdict:
        now = self._clock()
        on_busy = self.cfg.on_busy
        # sample CPU on every evaluation, even while another rule holds, so the window stays filled
        measured = self._sample_cpu() if self.cfg.max_other_cpu_percent < 100 else None

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

    @property
    def paused_until(self) -> float | None:
        if self._paused_until is not None and self._clock() >= self._paused_until:
            self._paused_until = None
        return self._paused_until

    def evaluate(self) -> Verdict:
        if self._paused_until is not None:
            left = self._paused_until - self._clock()
            if left > 0:
                return Verdict(False, "paused", f"paused by the user ({_fmt_duration(left)} left)", self._on_busy)
            self._paused_until = None
        return Verdict(True, None, "idle policy off: always donate", self._on_busy)


__all__ = ["MAX_PAUSE_HOURS", "MIN_CPU_SPAN", "ON_BUSY", "RULES", "AlwaysIdle", "IdlePolicy", "Policy", "Verdict", "validate_idle_config"]

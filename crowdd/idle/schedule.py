"""The idle schedule: weekly time windows in which donation is allowed.

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
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta


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


__all__ = ["Schedule", "ScheduleError", "Window", "parse_schedule", "parse_window"]

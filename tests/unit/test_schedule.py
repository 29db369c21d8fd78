"""The schedule grammar: windows, wrapping past midnight, and the errors that name the entry."""

from __future__ import annotations

from datetime import datetime

import pytest

from crowdd.config import ConfigError, IdleConfig
from crowdd.idle.policy import validate_idle_config
from crowdd.idle.schedule import Schedule, ScheduleError, parse_schedule


def test_schedule_window_wraps_midnight() -> None:
    s = Schedule(["mon-fri 18:00-08:00", "sat,sun 00:00-24:00"])
    assert not s.contains(datetime(2026, 11, 25, 12, 0))  # Wed noon
    assert s.contains(datetime(2026, 11, 25, 18, 0))  # Wed 18:00
    assert s.contains(datetime(2026, 11, 26, 7, 59))  # Thu early (Wed's window)
    assert not s.contains(datetime(2026, 11, 26, 8, 0))
    assert not s.contains(datetime(2026, 11, 23, 3, 0))  # Mon 03:00: Sunday's day ended at 24:00
    assert s.contains(datetime(2026, 11, 28, 3, 0))  # Sat (Fri's window and Sat's day)
    assert s.contains(datetime(2026, 11, 29, 23, 59))  # Sun late
    assert s.next_start(datetime(2026, 11, 25, 12, 0)) == datetime(2026, 11, 25, 18, 0)


def test_schedule_monday_morning_outside_without_sunday_wrap() -> None:
    s = Schedule(["mon-fri 18:00-08:00"])
    assert not s.contains(datetime(2026, 11, 23, 3, 0))  # Mon 03:00: Sunday has no window
    assert s.contains(datetime(2026, 11, 28, 3, 0))  # Sat 03:00 belongs to Friday's window


def test_schedule_variants() -> None:
    assert Schedule(["22:00-06:00"]).contains(datetime(2026, 11, 25, 23, 0))
    s = Schedule(["Fri-Mon 09:00-10:00,12:00-13:00", "Wednesday 00:00-01:00"])
    assert s.contains(datetime(2026, 11, 29, 12, 30))  # Sun
    assert not s.contains(datetime(2026, 11, 24, 9, 30))  # Tue
    assert s.contains(datetime(2026, 11, 25, 0, 30))
    assert Schedule(["daily 00:00-24:00"]).contains(datetime(2026, 11, 25, 23, 59))
    assert Schedule([]).contains(datetime(2026, 11, 25, 3, 0))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("mon-fri", "expected 'DAYS HH:MM-HH:MM'"),
        ("mon fri 18:00-08:00", "expected 'DAYS HH:MM-HH:MM'"),
        ("", "expected 'DAYS HH:MM-HH:MM'"),
        ("funday 18:00-20:00", "unknown day 'funday'"),
        ("mon,,tue 18:00-20:00", "empty day"),
        ("mon 18:00", "expected a range HH:MM-HH:MM"),
        ("mon 18-20", "expected a time HH:MM"),
        ("mon 25:00-26:00", "not a valid time for a start"),
        ("mon 10:60-11:00", "not a valid time"),
        ("mon 24:00-08:00", "not a valid time for a start"),
        ("mon 08:00-24:30", "not a valid time for an end"),
        ("mon 08:00-08:00", "start equals end"),
        ("mon 00:00-00:00", "start equals end"),
    ],
)
def test_bad_schedules(entry: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        parse_schedule(["sat 10:00-11:00", entry])
    with pytest.raises(ScheduleError, match=r"^\[1\]"):
        parse_schedule(["sat 10:00-11:00", entry])
    with pytest.raises(ConfigError, match="idle.schedule") as info:
        validate_idle_config(IdleConfig(schedule=["sat 10:00-11:00", entry]))
    assert info.value.key == "idle.schedule"


def test_schedule_not_a_string() -> None:
    with pytest.raises(ScheduleError, match="expected a string"):
        parse_schedule([42])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="expected a list of strings"):
        validate_idle_config(IdleConfig(schedule="mon 10:00-11:00"))  # type: ignore[arg-type]

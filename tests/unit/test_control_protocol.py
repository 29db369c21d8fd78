"""The control socket's typed messages: the pause request, its duration grammar, how a pause is shown."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from crowdd.errors import ErrorCode, InputError
from crowdd.idle import policy
from crowdd.protocol.control import (
    MAX_PAUSE_HOURS,
    check_pause,
    format_left,
    format_pause,
    make_pause,
    make_resume,
    parse_duration,
)


@pytest.mark.parametrize(
    ("text", "hours"),
    [("2h", 2.0), ("30m", 0.5), ("1.5h", 1.5), ("90m", 1.5), ("1d", 24.0), ("2", 2.0), ("0.25", 0.25),
     ("1h30m", 1.5), (" 2 H ", 2.0), ("45min", 0.75), ("3hours", 3.0), ("2 days", 48.0), (".5h", 0.5)],
)
def test_durations_the_user_may_write(text: str, hours: float) -> None:
    assert parse_duration(text) == pytest.approx(hours)


@pytest.mark.parametrize(
    ("text", "why"),
    [("", "expected a duration"), ("2x", "expected a duration"), ("h", "expected a duration"),
     ("-1h", "expected a duration"), ("1h30", "expected a duration"), ("1e3", "expected a duration"),
     ("nan", "expected a duration"), ("inf", "expected a duration"), ("two hours", "expected a duration"),
     ("0", "more than 0"), ("0m", "more than 0"), ("366d", "at most a year"), ("1,5h", "expected a duration")],
)
def test_bad_durations_are_refused_naming_the_field(text: str, why: str) -> None:
    with pytest.raises(InputError) as err:
        parse_duration(text, field="duration")
    assert err.value.code is ErrorCode.BAD_FIELD and err.value.field == "duration"
    assert why in err.value.message and repr(text) in err.value.message


def test_pause_request_round_trips_and_checks_hours() -> None:
    assert make_pause(2.0) == {"type": "pause", "hours": 2.0}
    assert make_resume() == {"type": "resume"}
    assert check_pause(make_pause(1.5)) == 1.5
    assert check_pause({"type": "pause", "hours": 3}) == 3.0
    for bad in (None, "2h", True, 0, -1, float("nan"), float("inf"), MAX_PAUSE_HOURS + 1):
        with pytest.raises(InputError) as err:
            check_pause({"type": "pause", "hours": bad})
        assert err.value.field == "hours"
    with pytest.raises(InputError):
        check_pause({"type": "pause"})


def test_the_protocol_and_the_policy_agree_on_the_longest_pause() -> None:
    assert MAX_PAUSE_HOURS == policy.MAX_PAUSE_HOURS


def test_format_pause() -> None:
    now = datetime(2026, 11, 29, 12, 31).timestamp()
    assert format_pause(datetime(2026, 11, 29, 14, 30).timestamp(), now) == "paused until 14:30 (1 h 59 min left)"
    assert format_pause(now + 30, now).endswith("(under a minute left)")
    assert format_pause(datetime(2026, 11, 30, 9, 0).timestamp(), now) == "paused until Mon 09:00 (20 h 29 min left)"
    assert format_pause(now + 30 * 86400, now).startswith("paused until 2026-12-29 12:31")
    assert format_pause(time.time() + 3600).startswith("paused until ")


def test_format_left() -> None:
    assert format_left(59) == "under a minute"
    assert format_left(12 * 60 + 5) == "12 min"
    assert format_left(2 * 3600) == "2 h"
    assert format_left(2 * 3600 + 60) == "2 h 1 min"
    assert format_left(3 * 86400 + 4 * 3600 + 59) == "3 d 4 h"
    assert format_left(2 * 86400) == "2 d"
    assert format_left(-5) == "under a minute"

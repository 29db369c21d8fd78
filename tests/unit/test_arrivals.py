"""The host's loop wakes on the first finished round (crowdd.job.arrivals).

The values are plain objects with the one attribute ``Arrivals`` reads, set the way TF's
``RemoteValueImpl`` sets it (``_set_values``: ``self._status_available_event.set()`` from the
coordinator's worker thread)."""

from __future__ import annotations

import threading
import time

import pytest

from crowdd.job.arrivals import SAFETY_NET_SECS, Arrivals


class Value:
    def __init__(self) -> None:
        self._status_available_event = threading.Event()

    def finish(self) -> None:
        self._status_available_event.set()


def finish_later(value: Value, seconds: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(seconds), value.finish()))
    t.start()
    return t


def test_wakes_on_the_first_to_finish_whatever_its_place() -> None:
    arrivals = Arrivals()
    values = [Value() for _ in range(3)]
    for v in values:
        arrivals.watch(v)
    t = finish_later(values[2], 0.3)
    t0 = time.monotonic()
    assert arrivals.wait(values, 5.0) == 2
    waited = time.monotonic() - t0
    t.join()
    assert 0.25 <= waited < 0.3 + SAFETY_NET_SECS / 2, waited  # woken by the event, not a poll


def test_times_out_when_none_finishes() -> None:
    arrivals = Arrivals()
    values = [Value(), Value()]
    for v in values:
        arrivals.watch(v)
    t0 = time.monotonic()
    assert arrivals.wait(values, 0.2) == -1
    assert time.monotonic() - t0 >= 0.2
    assert arrivals.wait([], 0.0) == -1


def test_a_value_finished_before_it_was_watched_is_seen() -> None:
    arrivals = Arrivals()
    v = Value()
    v.finish()
    arrivals.watch(v)
    assert arrivals.wait([v], 0.0) == 0
    assert v._status_available_event.is_set()  # a fetch waiting on the new event returns


def test_a_set_lost_in_the_swap_is_caught_by_the_safety_net() -> None:
    arrivals = Arrivals()
    v = Value()
    old = v._status_available_event
    arrivals.watch(v)
    old.set()  # TF's thread read the attribute before the swap and set the old event after it
    assert arrivals.wait([v], SAFETY_NET_SECS * 3) == 0
    assert v._status_available_event.is_set()


def test_a_rerun_clears_both_events() -> None:
    arrivals = Arrivals()
    v = Value()
    old = v._status_available_event
    old.set()
    arrivals.watch(v)
    v._status_available_event.clear()  # TF's _rebuild_on: the function runs again on another worker
    assert not old.is_set()
    assert arrivals.wait([v], 0.05) == -1


def test_refuses_a_value_it_cannot_watch() -> None:
    with pytest.raises(TypeError, match="no status event"):
        Arrivals().watch(object())

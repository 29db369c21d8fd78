"""The churn figures' arithmetic (crowdd.testing.churn): stalls, availability, goodput."""

from __future__ import annotations

import pytest

from crowdd.testing.churn import Availability, goodput, longest_stall, samples_between


def test_the_longest_stall_is_the_longest_time_without_new_steps() -> None:
    pts = [(0.0, 0), (1.0, 10), (2.0, 10), (9.0, 10), (10.0, 20), (11.0, 30)]
    assert longest_stall(pts, 0.0, 11.0) == pytest.approx(9.0)  # 1 -> 10: repeated step 10 is no progress
    assert longest_stall(pts, 0.0, 20.0) == pytest.approx(9.0)  # the tail 11 -> 20 is 9 s too
    assert longest_stall(pts, 0.0, 25.0) == pytest.approx(14.0)
    assert longest_stall(pts, 9.5, 11.0) == pytest.approx(1.0)


def test_availability_is_time_weighted_and_counts_the_host() -> None:
    a = Availability(0.0, {"w1", "w2"})
    a.set("w1", False, 10.0)  # frozen
    a.set("w1", True, 20.0)  # thawed
    a.set("w3", True, 30.0)  # a newcomer
    assert a.at(5.0) == 3 and a.at(15.0) == 2 and a.at(35.0) == 4
    assert a.mean(0.0, 40.0) == pytest.approx((10 * 3 + 10 * 2 + 10 * 3 + 10 * 4) / 40)


def test_goodput_compares_with_what_the_available_machines_could_do() -> None:
    pts = [(0.0, 0), (10.0, 100), (20.0, 200)]
    samples, secs = samples_between(pts, 0.0, 20.0, 50)
    assert (samples, secs) == (10000.0, 20.0)
    assert goodput(samples / secs, 250.0, 2.0) == pytest.approx(1.0)
    assert goodput(samples / secs, 250.0, 2.5) == pytest.approx(0.8)
    assert goodput(1.0, 0.0, 2.0) == 0.0

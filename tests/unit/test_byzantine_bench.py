"""benchmarks/byzantine.py's arithmetic: time to target, honest rejections, checks to expulsion."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "byzantine.py"
    spec = importlib.util.spec_from_file_location("byzantine_bench", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load()

EVENTS = [
    {"event": "eval", "test_accuracy": 0.80, "train_seconds": 2.0},
    {"event": "progress", "test_accuracy": 0.99, "train_seconds": 3.0},  # not an eval
    {"event": "eval", "test_accuracy": 0.86, "train_seconds": 4.5},
    {"event": "eval", "test_accuracy": 0.84, "train_seconds": 6.0},
    {"event": "done", "test_accuracy": 0.87},
]
AUDIT = [
    {"slot": 0, "accepted": False},  # the host's own: never counted
    {"slot": 1, "accepted": True},
    {"slot": 3, "accepted": False, "reason": "direction"},
    {"slot": 2, "accepted": False, "reason": "loss"},
    {"slot": 3, "accepted": False, "reason": "direction"},
    {"slot": 1, "accepted": True},
    {"slot": 3, "accepted": False, "reason": "direction"},
]


def test_bad_slots_are_the_highest() -> None:
    assert bench.bad_slots(0) == [] and bench.bad_slots(1) == [3] and bench.bad_slots(2) == [2, 3]
    assert bench.hook("sign-flip", [2, 3]) == "2:sign-flip,3:sign-flip"
    with pytest.raises(ValueError):
        bench.bad_slots(4)


def test_time_to_target_is_the_first_eval_at_or_above_it() -> None:
    assert bench.time_to(EVENTS, 0.85) == 4.5
    assert bench.time_to(EVENTS, 0.80) == 2.0
    assert bench.time_to(EVENTS, 0.9) is None
    assert bench.train_seconds(EVENTS) == 6.0


def test_honest_rejections_leave_out_slot_0_and_the_bad_slots() -> None:
    assert bench.honest_rejected(AUDIT, [3]) == (1, 3)
    assert bench.honest_rejected(AUDIT, [2, 3]) == (0, 2)
    assert bench.honest_rejected(AUDIT, []) == (4, 6)


def test_checks_to_expel_counts_the_slots_checked_changes() -> None:
    assert bench.checks_to_expel(AUDIT, 3, True) == 3
    assert bench.checks_to_expel(AUDIT, 2, False) is None


def test_measure_and_judge() -> None:
    events = [*EVENTS[:-1], {"event": "done", "test_accuracy": 0.87,
                             "validation": {"expelled": {"3": "3 of its last 3"}, "check_cpu_seconds": 0.3,
                                            "checked": 7}}]
    m = bench.measure(events, AUDIT, [3], 0.85)
    assert m["checks_to_expel"] == {"3": 3} and m["honest_rejected"] == 1
    assert m["cpu_share"] == pytest.approx(0.05)
    clean = {"test_accuracy": 0.875, "time_to_target": 4.0}
    v = bench.judge(bench.combine([m], [3]), clean, 1)
    assert v == {"time": True, "accuracy": True, "expel": True, "honest": False, "cpu": True}
    assert "error" in bench.measure([{"event": "error", "message": "x"}], [], [3], 0.85)

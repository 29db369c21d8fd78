"""The accuracy and error bounds the tests assert, each reached value recorded.

A bound is worth something only near what runs reach (issue 30): every test that checks one
calls :func:`at_least` or :func:`at_most`, which asserts it and, when ``CROWDD_METRICS``
names a file, appends one JSON line (the test, what was measured, the value, the bound). The
comment beside each bound cites such measurements:

    CROWDD_METRICS=/tmp/metrics.jsonl scripts/test tests/integration
"""

from __future__ import annotations

import json
import os
import time


def _record(what: str, value: float, bound: float, sense: str) -> None:
    path = os.environ.get("CROWDD_METRICS")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    line = {"test": test, "what": what, "value": round(float(value), 4), "bound": bound, "sense": sense,
            "time": round(time.time())}
    with open(path, "a") as fh:
        fh.write(json.dumps(line) + "\n")


def at_least(value: float, bound: float, what: str = "test_accuracy") -> None:
    """Assert ``value >= bound`` (and record it)."""
    _record(what, value, bound, ">=")
    assert value >= bound, f"{what} {value:.4f} is under its bound {bound:.4f}"


def at_most(value: float, bound: float, what: str = "test_mae") -> None:
    """Assert ``value <= bound`` (and record it)."""
    _record(what, value, bound, "<=")
    assert value <= bound, f"{what} {value:.4f} is over its bound {bound:.4f}"


__all__ = ["at_least", "at_most"]

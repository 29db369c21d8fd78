"""The bound checks the tests use: they assert, and record each reached value when asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crowdd.testing.bounds import at_least, at_most


def test_a_bound_is_asserted_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("CROWDD_METRICS", str(out))
    at_least(0.91, 0.8)
    at_most(47.5, 55, "test_mae")
    with pytest.raises(AssertionError, match="under its bound"):
        at_least(0.79, 0.8)
    with pytest.raises(AssertionError, match="over its bound"):
        at_most(56, 55, "test_mae")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["what"], r["value"], r["bound"], r["sense"]) for r in lines] == [
        ("test_accuracy", 0.91, 0.8, ">="), ("test_mae", 47.5, 55, "<="),
        ("test_accuracy", 0.79, 0.8, ">="), ("test_mae", 56, 55, "<=")]
    assert all(r["test"].endswith("test_a_bound_is_asserted_and_recorded") for r in lines)


def test_nothing_is_recorded_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CROWDD_METRICS", raising=False)
    monkeypatch.chdir(tmp_path)
    at_least(1.0, 0.5)
    assert not list(tmp_path.iterdir())

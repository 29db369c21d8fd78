"""The members file (crowdd.job.membership): the contract with the host daemon, TF-free."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from crowdd.job import EVENT_KINDS, MEMBERS_FILE
from crowdd.job.membership import Members, MembersError, MembersWatcher, parse_members


def write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_a_good_file_parses_and_worker_0_is_always_live() -> None:
    m = parse_members({"version": 3, "live": [3, 1], "fresh": [3]}, 4)
    assert m == Members(3, frozenset({0, 1, 3}), frozenset({3}))
    assert parse_members({"version": 0, "live": []}, 2).live == {0}
    assert Members.everyone(3).live == {0, 1, 2}


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        ([1, 2], "object"),
        ({"live": [1]}, "version"),
        ({"version": -1, "live": [1]}, "version"),
        ({"version": True, "live": [1]}, "version"),
        ({"version": 1, "live": "1,2"}, "list"),
        ({"version": 1, "live": [4]}, "worker index"),
        ({"version": 1, "live": [1.0]}, "worker index"),
        ({"version": 1, "live": [1], "fresh": [2]}, "not live"),
        ({"version": 1, "live": [1], "extra": 1}, "unknown"),
    ],
)
def test_a_bad_file_is_refused_with_the_reason(obj: object, words: str) -> None:
    with pytest.raises(MembersError, match=words):
        parse_members(obj, 4)


def test_the_watcher_keeps_the_last_good_version_through_garbage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / MEMBERS_FILE
    watcher = MembersWatcher(path, 4)
    assert watcher.poll() is None  # no file yet
    write(path, json.dumps({"version": 1, "live": [1, 2]}))
    assert watcher.poll() == Members(1, frozenset({0, 1, 2}))
    assert watcher.poll() is None  # unchanged
    with caplog.at_level(logging.WARNING, logger="crowdd.job.membership"):
        write(path, '{"version": 2, "live": [1')  # torn / garbled
        assert watcher.poll() is None
        write(path, json.dumps({"version": 2, "live": [9]}))  # no such slot
        assert watcher.poll() is None
        write(path, json.dumps({"version": 1, "live": [1]}))  # not newer
        assert watcher.poll() is None
    assert watcher.current == Members(1, frozenset({0, 1, 2}))
    assert "not JSON" in caplog.text and "worker index" in caplog.text and "not newer" in caplog.text
    write(path, json.dumps({"version": 5, "live": [3], "fresh": [3]}))
    assert watcher.poll() == Members(5, frozenset({0, 3}), frozenset({3}))
    path.unlink()
    assert watcher.poll() is None and watcher.current is not None and watcher.current.version == 5


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / MEMBERS_FILE
    write(path, json.dumps({"version": 1, "live": [1] * 40_000}))
    assert MembersWatcher(path, 2).poll() is None


def test_membership_events_are_job_event_kinds() -> None:
    assert {"members", "slot"} <= set(EVENT_KINDS)

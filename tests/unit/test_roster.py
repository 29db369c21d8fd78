"""The host's live training slots and the members file its job reads."""

from __future__ import annotations

import json
from pathlib import Path

from crowdd.job import MEMBERS_FILE
from crowdd.node.roster import Roster


def read(tmp_path: Path) -> dict:
    return json.loads((tmp_path / MEMBERS_FILE).read_text())


def test_the_file_follows_the_live_set_and_marks_restarted_servers_fresh(tmp_path: Path) -> None:
    r = Roster(tmp_path)
    assert r.set({1, 2}) is True
    assert read(tmp_path) == {"version": 1, "live": [1, 2], "fresh": []}
    assert r.set({2, 1}) is False  # unchanged: not rewritten
    assert r.set({2}) is True
    assert read(tmp_path) == {"version": 2, "live": [2], "fresh": []}
    r.started(1)  # slot 1's server was started again while it was out
    assert r.set({1, 2}) is True
    assert read(tmp_path) == {"version": 3, "live": [1, 2], "fresh": [1]}
    r.set({2})
    r.set({1, 2})  # back without a restart: not fresh this time
    assert read(tmp_path)["fresh"] == []
    assert r.ever == {1, 2}
    assert not list(tmp_path.glob(".*tmp"))  # written by rename, no temporary left


def test_the_hosts_own_slot_is_never_listed(tmp_path: Path) -> None:
    r = Roster(tmp_path)
    r.set({0, 3})
    assert read(tmp_path)["live"] == [3]


def test_an_empty_first_set_is_still_written(tmp_path: Path) -> None:
    r = Roster(tmp_path)
    assert r.set(set()) is True
    assert read(tmp_path) == {"version": 1, "live": [], "fresh": []}

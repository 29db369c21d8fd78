"""The host's training slots: who can train, who is cut, where a newcomer sits."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from crowdd.job import MEMBERS_FILE
from crowdd.node.roster import Roster
from crowdd.node.session import Member
from crowdd.node.slots import TrainingSlots
from crowdd.node.tunnels import HostTunnels


def member(i: int, **kw: Any) -> Member:
    return Member(index=i, name=f"w{i}", address="127.0.0.1", role="worker", **kw)


def make(tmp_path: Path, workers: list[Member], wanted: int) -> tuple[TrainingSlots, HostTunnels, list[int], list[str]]:
    session: Any = SimpleNamespace(workers=workers)
    tunnels = HostTunnels(directory=tmp_path)
    frees: list[int] = []
    said: list[str] = []
    slots = TrainingSlots(session, tunnels, Roster(tmp_path), list(range(1, wanted + 1)), say=said.append,
                          on_free=frees.append)
    return slots, tunnels, frees, said


def live(tmp_path: Path) -> list[int]:
    return json.loads((tmp_path / MEMBERS_FILE).read_text())["live"]


def test_only_started_present_workers_train_and_the_rest_are_cut(tmp_path: Path) -> None:
    ws = [member(1, started=True), member(2, started=False), member(3, started=True)]
    slots, tunnels, frees, _ = make(tmp_path, ws, 4)
    slots.sync()
    assert live(tmp_path) == [1, 3]
    assert tunnels.is_cut(2) and not tunnels.is_cut(1)
    assert frees == [1]  # slot 4: nobody holds it
    ws[2].away = "the user is back"
    slots.sync()
    assert live(tmp_path) == [1] and tunnels.is_cut(3)
    assert frees == [1]  # away keeps its slot
    ws[2].away = None
    ws[0].alive = False  # worker 1 is gone
    slots.sync()
    assert live(tmp_path) == [3] and tunnels.is_cut(1) and not tunnels.is_cut(3)
    assert frees == [1, 2]  # its slot is free now
    assert slots.trained == {1, 3}


def test_a_newcomer_takes_a_free_slot_first_then_a_gone_workers(tmp_path: Path) -> None:
    ws = [member(1, started=True), member(2, started=True)]
    slots, tunnels, _, _ = make(tmp_path, ws, 3)
    n3 = member(3)
    ws.append(n3)
    assert slots.seat(n3) == 3 and slots.holders() == {1: 1, 2: 2, 3: 3}
    ws[0].alive = False
    n4 = member(4)
    ws.append(n4)
    assert slots.seat(n4) == 1  # worker 1's place, since it is gone
    assert ws[0].slot is None and slots.holders()[1] == 4
    n5 = member(5)
    ws.append(n5)
    assert slots.seat(n5) is None  # no place left
    n4.started = True
    slots.sync()
    assert live(tmp_path) == [1, 2]  # slot 1 trains again, now with the newcomer


def test_a_restarted_server_is_fresh_when_it_comes_back(tmp_path: Path) -> None:
    ws = [member(1, started=True)]
    slots, _, _, _ = make(tmp_path, ws, 1)
    slots.sync()
    ws[0].started = False
    slots.sync()
    slots.started(ws[0])
    ws[0].started = True
    slots.sync()
    assert json.loads((tmp_path / MEMBERS_FILE).read_text()) == {"version": 3, "live": [1], "fresh": [1]}


def test_a_newcomer_takes_an_empty_slot_before_a_frozen_workers(tmp_path: Path) -> None:
    """A worker silent for a while may be frozen and thaw soon: a newcomer takes a slot nobody
    holds first, then the one whose worker has been gone longest."""
    ws = [member(1, started=True, alive=False, gone_since=20.0), member(2, started=True, alive=False, gone_since=10.0)]
    slots, _, _, _ = make(tmp_path, ws, 3)
    assert slots.free() == [3, 2, 1]
    n = member(3)
    ws.append(n)
    assert slots.seat(n) == 3
    n4 = member(4)
    ws.append(n4)
    assert slots.seat(n4) == 2  # gone since 10.0: longer than worker 1

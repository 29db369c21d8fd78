"""Who trains (crowdd.job.trainers, TF-free): the members file against the attached slots; a
failed slot comes back only when the file says its server is fresh, an expelled one only with a
newcomer behind it; the last slot gone ends the job."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from crowdd.job.events import EventWriter
from crowdd.job.membership import Members
from crowdd.job.trainers import Trainers


class Cluster:
    """The strategy's slots, as the trainers see them (ElasticCluster's seam)."""

    def __init__(self, attached: set[int], refuse: frozenset[int] = frozenset()) -> None:
        self.on = set(attached)
        self.refuse = refuse
        self.calls: list[tuple[str, int, Any]] = []

    def attached(self) -> set[int]:
        return set(self.on)

    def detach(self, index: int, why: str) -> Any:
        self.on.discard(index)
        self.calls.append(("detach", index, why))
        return f"round-on-{index}"

    def attach(self, index: int, fresh: bool) -> float:
        if index in self.refuse:
            raise ConnectionError("its server does not answer")
        self.on.add(index)
        self.calls.append(("attach", index, fresh))
        return 0.01


def members(version: int, live: set[int], fresh: set[int] = frozenset()) -> Members:  # type: ignore[assignment]
    return Members(version, frozenset(live), frozenset(fresh))


def make(live: set[int], num: int = 4, refuse: frozenset[int] = frozenset()
         ) -> tuple[Trainers, Cluster, io.StringIO, list[Any], list[int], list[str]]:
    out = io.StringIO()
    gone: list[str] = []
    t = Trainers(members(0, live), num, EventWriter(out), gone.append)
    cluster = Cluster(live, refuse)
    given_back: list[Any] = []
    forgiven: list[int] = []
    t.slots, t.given_back, t.forgive = cluster, given_back.append, forgiven.append
    return t, cluster, out, given_back, forgiven, gone


def events(out: io.StringIO, kind: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, out.getvalue().splitlines()) if e["event"] == kind]


def test_the_file_attaches_newcomers_and_detaches_leavers_giving_their_round_back() -> None:
    t, cluster, out, given_back, _, _ = make({0, 1, 2})
    t.apply(members(1, {0, 2, 3}))
    assert cluster.attached() == {0, 2, 3}
    assert given_back == ["round-on-1"]  # slot 1's running round: its steps go back
    slots = events(out, "slot")
    assert {(e["task"], e["state"]) for e in slots} == {(1, "left"), (3, "joined")}
    assert events(out, "members")[-1]["training"] == [0, 2, 3]


def test_worker_0_the_hosts_own_is_never_detached() -> None:
    t, cluster, _, _, _, _ = make({0, 1})
    t.apply(members(1, {1}))
    assert 0 in cluster.attached()


def test_a_failed_slot_comes_back_only_with_a_fresh_server() -> None:
    t, cluster, out, _, _, _ = make({0, 1, 2})
    cluster.on.discard(1)
    t.on_retire(1, 2, ConnectionError("gone"))
    t.apply(members(1, {0, 1, 2}))  # the file still lists it, same server: it stays out
    assert 1 not in cluster.attached()
    t.apply(members(2, {0, 1, 2}, fresh={1}))  # its server was started again
    assert 1 in cluster.attached() and ("attach", 1, True) in cluster.calls
    assert events(out, "slot")[-1]["why"] == "a fresh server"


def test_an_expelled_slot_comes_back_only_with_a_newcomer_behind_it() -> None:
    t, cluster, out, given_back, forgiven, _ = make({0, 1, 2})
    t.expel(2, "its changes keep failing validation")
    assert 2 not in cluster.attached() and given_back == ["round-on-2"]
    assert events(out, "expel") and events(out, "expel")[0]["task"] == 2
    t.apply(members(1, {0, 1, 2}))  # the same member, still listed: stays out
    assert 2 not in cluster.attached() and forgiven == []
    t.apply(members(2, {0, 1, 2}, fresh={2}))  # a newcomer took the slot: a clean record
    assert 2 in cluster.attached() and forgiven == [2]


def test_a_slot_that_cannot_join_stays_out_and_training_goes_on() -> None:
    t, cluster, out, _, _, gone = make({0, 1}, refuse=frozenset({2}))
    t.apply(members(1, {0, 1, 2}))
    assert cluster.attached() == {0, 1} and not gone
    assert events(out, "slot")[-1] == {**events(out, "slot")[-1], "task": 2, "state": "left"}


@pytest.mark.parametrize("how", ["failed", "expelled"])
def test_the_last_slot_gone_ends_the_job_and_the_control_does_not(how: str) -> None:
    t, cluster, _, _, _, gone = make({1, 2})
    cluster.on.discard(1)
    if how == "failed":
        t.on_retire(1, 1, ConnectionError("gone"))
    else:
        t.expel(1, "bad changes")
    assert not gone  # the control: slot 2 still trains
    cluster.on.discard(2)
    if how == "failed":
        t.on_retire(2, 0, ConnectionError("gone"))
    else:
        t.expel(2, "bad changes")
    assert len(gone) == 1 and "every worker" in gone[0]

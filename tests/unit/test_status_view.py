"""StatusView: status as a projection of the state authority and the current session."""

from __future__ import annotations

from typing import Any

import pytest

from crowdd.hyperparams import GroupSettings, Job
from crowdd.node.states import InvalidTransition, State, StateMachine
from crowdd.node.status import StatusView
from crowdd.plan import DatasetRef, MemberPorts, PlanMember, SessionPlan
from crowdd.platform.systemd import Notifier
from crowdd.protocol.control import STATUS_KEYS
from crowdd.protocol.matchmaker import Wait

S = State


def plan(index: int = 1) -> SessionPlan:
    members = (PlanMember(0, "host", "h", "10.0.0.1", MemberPorts(1, 2, (3, 4))),
               PlanMember(1, "worker", "w", "10.0.0.2", MemberPorts(5, 6, (7,))))
    return SessionPlan("g1", "t" * 64, index, members, Job(epochs=3), DatasetRef("0" * 64, 100, "d"),
                       GroupSettings(route="chain"))


class Node:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.states = StateMachine(lambda old, new: self.view.on_transition(old, new))
        self.view = StatusView("n", self.states, lambda kind, **f: self.events.append((kind, f)), Notifier())

    def walk(self, *states: State) -> None:
        for s in states:
            self.states.to(s)


def test_status_has_every_key_of_the_schema() -> None:
    assert tuple(Node().view.status()) == STATUS_KEYS


def test_queue_place_only_while_waiting() -> None:
    n = Node()
    n.view.set_donating(True)
    n.view.begin("worker")
    n.walk(S.STANDBY, S.REGISTERING)
    n.view.on_wait(Wait(3, 1, 5))
    assert n.states.state == S.WAITING
    assert n.view.status()["queue"] == {"position": 3, "hosts": 1, "workers": 5}
    n.view.joined(plan())
    n.walk(S.REPLICATING)
    st = n.view.status()
    assert st["queue"] is None
    assert st["group"] is not None and st["group"]["index"] == 1 and [m["name"] for m in st["group"]["members"]] == ["h", "w"]
    assert st["settings"] is not None and st["settings"]["route"] == "chain"
    assert st["job"] is not None and st["job"]["epochs"] == 3


def test_training_and_result_only_when_true() -> None:
    n = Node()
    n.view.begin("worker")
    n.walk(S.REGISTERING, S.WAITING)
    n.view.joined(plan())
    n.walk(S.REPLICATING, S.TRAINING)
    n.view.on_training_event({"event": "progress", "epoch": 1, "step": 10, "samples_per_sec": 5.0})
    n.view.on_training_event({"event": "eval", "test_accuracy": 0.5})
    st = n.view.status()
    assert st["training"] is not None and st["training"]["step"] == 10 and st["training"]["test_accuracy"] == 0.5
    assert st["result"] is None
    n.view.finished(0.9, None)  # a worker: the model file is the host's
    n.walk(S.FINISHED)
    assert n.view.status()["result"] == {"test_accuracy": 0.9, "model_path": None}
    n.view.end()
    n.walk(S.OFF)
    st = n.view.status()
    assert st["training"] is None and st["group"] is None
    assert st["result"] == {"test_accuracy": 0.9, "model_path": None}  # what the last session ended with
    n.view.begin("worker")  # a new cycle: the last result is no longer shown as current
    assert n.view.status()["result"] is None


def test_last_error_between_sessions_and_cleared_by_the_next() -> None:
    n = Node()
    n.view.begin("host")
    n.view.fail("cannot host /x: no such file")
    n.view.end()
    assert n.view.status()["error"] == "cannot host /x: no such file"
    n.view.begin("host")
    assert n.view.status()["error"] is None


def test_idle_verdict_follows_the_donation_switch() -> None:
    n = Node()
    assert n.view.status()["idle"]["reason"] == "donation is off"
    n.view.set_donating(True)
    assert n.view.status()["idle"]["reason"] == "checking the idle policy"
    n.view.set_donating(False)
    assert n.view.status()["idle"]["reason"] == "donation is off"


def test_transitions_publish_the_previous_state_and_invalid_ones_raise() -> None:
    n = Node()
    n.walk(S.STANDBY)
    assert ("state", {"state": "standby", "previous": "off"}) in n.events
    before = list(n.events)
    with pytest.raises(InvalidTransition):
        n.states.to(S.TRAINING)
    assert n.events == before and n.states.state == S.STANDBY


def test_no_session_means_no_session_fields() -> None:
    n = Node()
    with pytest.raises(RuntimeError):
        n.view.on_training_event({"event": "progress"})


def test_dataset_and_job_of_the_last_session_stay_on_show_until_the_next_cycle() -> None:
    n = Node()
    rec = n.view.begin("host")
    rec.job = Job(epochs=7)
    rec.dataset = {"name": "mnist", "size": 10, "digest": "ab"}
    n.walk(S.REGISTERING)
    n.view.fail("refused")
    n.view.end()
    n.walk(S.STANDBY)
    st = n.view.status()
    assert st["dataset"] == {"name": "mnist", "size": 10, "digest": "ab"}
    assert st["job"] is not None and st["job"]["epochs"] == 7 and st["error"] == "refused"
    assert st["role"] is None and st["queue"] is None and st["group"] is None
    n.view.begin("worker")
    st = n.view.status()
    assert st["dataset"] is None and st["job"] is None and st["error"] is None and st["role"] == "worker"


def test_on_wait_moves_to_waiting_and_publishes_the_state_then_the_status() -> None:
    n = Node()
    n.view.begin("worker")
    n.walk(S.STANDBY, S.REGISTERING)
    n.events.clear()
    n.view.on_wait(Wait(2, 0, 1))
    kinds = [k for k, _ in n.events]
    assert kinds == ["state", "status"]
    assert n.events[0][1] == {"state": "waiting", "previous": "registering"}
    assert n.events[1][1]["queue"] == {"position": 2, "hosts": 0, "workers": 1}
    n.view.on_wait(Wait(1, 0, 1))  # already waiting: only the new place
    assert [k for k, _ in n.events] == ["state", "status", "status"]
    assert n.view.status()["queue"] == {"position": 1, "hosts": 0, "workers": 1}
    n.walk(S.REGISTERING)  # back to registering (the matchmaker went away): no queue place shown
    assert n.view.status()["queue"] is None


def test_training_events_update_the_fields_they_name() -> None:
    n = Node()
    n.view.begin("host")
    n.walk(S.REGISTERING, S.WAITING)
    n.view.joined(plan(0))
    n.walk(S.REPLICATING)
    n.view.on_training_event({"event": "progress", "epoch": 2, "step": 40, "loss": 0.3, "accuracy": 0.8,
                              "samples_per_sec": 10.0, "worker": 0})
    assert n.view.status()["training"] is None  # not training yet: not shown
    n.walk(S.TRAINING)
    n.view.on_training_event({"event": "progress", "step": 41, "samples_per_sec": 5.0, "worker": 1})
    n.view.on_training_event({"event": "bogus", "step": 999})
    tr = n.view.status()["training"]
    assert tr is not None
    assert (tr["epoch"], tr["epochs"], tr["step"], tr["loss"], tr["accuracy"]) == (2, 3, 41, 0.3, 0.8)
    assert tr["samples_per_sec"] == 15.0 and tr["test_accuracy"] is None
    n.view.on_training_event({"event": "eval", "epoch": 2, "test_accuracy": 0.75})
    assert n.view.status()["training"]["test_accuracy"] == 0.75  # type: ignore[index]
    assert [k for k, _ in n.events if k in ("progress", "eval")] == ["progress", "progress", "eval"]
    n.view.finished(0.77, "/m/model.keras")
    n.walk(S.FINISHED)
    st = n.view.status()
    assert st["result"] == {"test_accuracy": 0.77, "model_path": "/m/model.keras"}
    assert st["training"] is not None and st["training"]["test_accuracy"] == 0.77
    assert ("result", {"test_accuracy": 0.77, "model_path": "/m/model.keras"}) in n.events


def test_a_slot_that_left_no_longer_counts_in_the_groups_rate() -> None:
    n = Node()
    n.view.begin("host")
    n.walk(S.REGISTERING, S.WAITING)
    n.view.joined(plan(0))
    n.walk(S.REPLICATING, S.TRAINING)
    for worker, rate in ((0, 100.0), (1, 80.0), (2, 60.0)):
        n.view.on_training_event({"event": "progress", "step": 10, "samples_per_sec": rate, "worker": worker})
    assert n.view.status()["training"]["samples_per_sec"] == 240.0  # type: ignore[index]
    n.view.worker_left(1)
    assert n.view.status()["training"]["samples_per_sec"] == 160.0  # type: ignore[index]
    n.view.worker_left(7)  # never trained: nothing changes
    assert n.view.status()["training"]["samples_per_sec"] == 160.0  # type: ignore[index]

"""The group session's messages: every message survives to_frame → wire → check, and every
malformed frame is refused naming its field."""

from __future__ import annotations

import math
from typing import Any

import pytest

from crowdd import wire
from crowdd.protocol import session as sp

HEADER = wire.HEADER_SIZE


def over_the_wire(frame: dict[str, Any]) -> dict[str, Any]:
    """Encode and decode one frame, as a real connection would carry it."""
    return wire.decode_body(wire.encode(frame)[HEADER:])


# worker task 0 is the host's; there is no parameter server
CLUSTER = {"worker": ["127.0.0.1:27003", "127.0.0.1:27004", "127.0.0.1:27005", "127.0.0.1:27006"]}

WORKER_MESSAGES: list[sp.WorkerMessage] = [
    sp.StateReport("replicating"),
    *(sp.StateReport(s) for s in sp.MEMBER_STATES),
    sp.ReplicationReport(3, 10, 2),
    sp.ReplicationReport(0, 0),
    sp.ReplicationReport(10, 10, None),
    sp.Ready(),
    sp.JobReport("started"),
    sp.JobReport("exited", 1, "TF server died"),
    sp.JobReport("exited", -9, None),
    sp.JobReport("exited"),
    sp.Away("the user is active"),
    sp.Away("battery", staying=False),
    sp.Back(),
]

HOST_MESSAGES: list[sp.HostMessage] = [
    sp.MembersUpdate((
        sp.MemberView(0, "h", "10.0.0.1", "host", "training", 10, 10),
        sp.MemberView(1, "w1", "10.0.0.2", "worker", "replicating", 4, 10),
        sp.MemberView(2, "w2", "10.0.0.3", "worker", "expelled", 10, 10, "3 of its last 4 changes were rejected"),
    )),
    sp.MembersUpdate(()),
    sp.Train(CLUSTER, 1),
    sp.Train(CLUSTER, 3),
    sp.Dial(7, 2),
    sp.TrainingEvent({"event": "progress", "epoch": 1, "epochs": 3, "step": 40, "loss": 0.7, "worker": 0}),
    sp.TrainingEvent({"event": "eval", "epoch": 1, "test_accuracy": 0.91, "test_loss": 0.3}),
    sp.End(0.93, "/var/lib/crowdd/jobs/g-0/output/model.keras"),
    sp.End(None, None, "training failed: boom"),
    sp.End(1, None),
]


@pytest.mark.parametrize("msg", WORKER_MESSAGES, ids=repr)
def test_worker_messages_round_trip(msg: sp.WorkerMessage) -> None:
    assert sp.check_worker_frame(msg.to_frame()) == msg
    assert sp.check_worker_frame(over_the_wire(msg.to_frame())) == msg


@pytest.mark.parametrize("msg", HOST_MESSAGES, ids=repr)
def test_host_messages_round_trip(msg: sp.HostMessage) -> None:
    assert sp.check_host_frame(msg.to_frame()) == msg
    assert sp.check_host_frame(over_the_wire(msg.to_frame())) == msg


def test_training_event_keeps_the_jobs_event_key() -> None:
    ev = {"event": "progress", "step": 7, "loss": 1.25, "samples_per_sec": 300.0, "worker": 2}
    frame = sp.TrainingEvent(ev).to_frame()
    assert frame["type"] == "training" and frame["event"] == "progress"
    got = sp.check_host_frame(over_the_wire(frame))
    assert isinstance(got, sp.TrainingEvent)
    assert got.event == ev
    assert got.event["event"] == "progress"


def test_a_training_event_cannot_overwrite_the_frame_type() -> None:
    frame = sp.TrainingEvent({"event": "eval", "type": "end"}).to_frame()
    assert frame["type"] == "training"


def test_a_started_job_report_carries_no_exit_fields() -> None:
    assert sp.JobReport("started", 3, "x").to_frame() == {"type": "job", "event": "started"}


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"type": "state", "state": "dancing"}, "state"),
        ({"type": "state"}, "state"),
        ({"type": "replication", "done": 11, "total": 10}, "done"),
        ({"type": "replication", "done": -1, "total": 10}, "done"),
        ({"type": "replication", "done": 1, "total": "10"}, "total"),
        ({"type": "replication", "done": 1, "total": 10, "source": -2}, "source"),
        ({"type": "replication", "done": True, "total": 10}, "done"),
        ({"type": "job", "event": "crashed"}, "event"),
        ({"type": "job", "event": "exited", "code": -256}, "code"),
        ({"type": "job", "event": "exited", "code": 1, "message": 5}, "message"),
        ({"type": "away", "reason": 5}, "reason"),
        ({"type": "away", "reason": "busy", "staying": "yes"}, "staying"),
    ],
)
def test_malformed_worker_frames_name_the_field(frame: dict[str, Any], field: str) -> None:
    with pytest.raises(wire.WireError) as exc:
        sp.check_worker_frame(frame)
    assert exc.value.field == field
    assert exc.value.code == wire.ErrorCode.BAD_FIELD


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"type": "members", "members": {}}, "members"),
        ({"type": "members", "members": ["x"]}, "members[0]"),
        ({"type": "members", "members": [{"index": 0, "name": "h", "address": "a", "role": "host", "state": "lost"}]},
         "members[0].state"),
        ({"type": "members", "members": [{"index": 0, "name": 1, "address": "a", "role": "host", "state": "ready"}]},
         "members[0]"),
        ({"type": "members", "members": [{"index": 2, "name": "w", "address": "a", "role": "worker",
                                          "state": "expelled", "note": 5}]}, "members[0].note"),
        ({"type": "train", "cluster": CLUSTER, "index": 4}, "index"),
        ({"type": "train", "cluster": CLUSTER, "index": 0}, "index"),
        ({"type": "train", "cluster": CLUSTER}, "index"),
        ({"type": "train", "cluster": {"worker": []}, "index": 1}, "cluster"),
        ({"type": "train", "cluster": {}, "index": 1}, "cluster"),
        ({"type": "train", "cluster": ["127.0.0.1:1", "127.0.0.1:2"], "index": 1}, "cluster"),
        ({"type": "train", "cluster": {"worker": ["127.0.0.1:2", "127.0.0.1:3"], "evaluator": []}, "index": 1},
         "cluster"),
        # only workers: neither a parameter server nor a chief is anything a worker's job may know of
        ({"type": "train", "cluster": {"ps": ["127.0.0.1:1"], "worker": ["127.0.0.1:2", "127.0.0.1:3"]}, "index": 1},
         "cluster"),
        ({"type": "train", "cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2", "127.0.0.1:3"]},
          "index": 1}, "cluster"),
        ({"type": "train", "cluster": {"worker": ["127.0.0.1:2", 3]}, "index": 1}, "cluster.worker"),
        # a malicious host pointing a worker's TF server at another machine
        ({"type": "train", "cluster": {"worker": ["10.0.0.1:7003", "127.0.0.1:3"]}, "index": 1}, "cluster.worker"),
        ({"type": "train", "cluster": {"worker": ["127.0.0.1:2", "evil.example:3"]}, "index": 1}, "cluster.worker"),
        ({"type": "train", "cluster": {"worker": ["127.0.0.1:0x10", "127.0.0.1:3"]}, "index": 1}, "cluster.worker"),
        ({"type": "dial", "stream": -1, "task": 1}, "stream"),
        ({"type": "dial", "stream": 3, "task": 0}, "task"),
        ({"type": "training", "event": "done"}, "event"),
        ({"type": "training", "step": 3}, "event"),
        ({"type": "end", "test_accuracy": math.nan}, "test_accuracy"),
        ({"type": "end", "test_accuracy": math.inf}, "test_accuracy"),
        ({"type": "end", "test_accuracy": "0.9"}, "test_accuracy"),
        ({"type": "end", "test_accuracy": True}, "test_accuracy"),
        ({"type": "end", "model_path": 3}, "model_path"),
        ({"type": "end", "error": ["x"]}, "error"),
    ],
)
def test_malformed_host_frames_name_the_field(frame: dict[str, Any], field: str) -> None:
    with pytest.raises(wire.WireError) as exc:
        sp.check_host_frame(frame)
    assert exc.value.field == field
    assert exc.value.code == wire.ErrorCode.BAD_FIELD


@pytest.mark.parametrize("kind", ["train", "end", "members", "hello", None])
def test_unknown_worker_frame_types_are_refused(kind: str | None) -> None:
    with pytest.raises(wire.WireError) as exc:
        sp.check_worker_frame({"type": kind})
    assert exc.value.code == wire.ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize("kind", ["state", "ready", "job", "replication", "nonsense"])
def test_unknown_host_frame_types_are_refused(kind: str) -> None:
    with pytest.raises(wire.WireError) as exc:
        sp.check_host_frame({"type": kind})
    assert exc.value.code == wire.ErrorCode.UNKNOWN_TYPE


def test_long_messages_are_cut() -> None:
    got = sp.check_worker_frame({"type": "job", "event": "exited", "code": 1, "message": "x" * 10_000})
    assert isinstance(got, sp.JobReport) and got.message == "x" * 4096


def test_members_without_replication_count_zero() -> None:
    got = sp.check_host_frame({"type": "members", "members": [
        {"index": 1, "name": "w", "address": "10.0.0.2", "role": "worker", "state": "joining"}]})
    assert got == sp.MembersUpdate((sp.MemberView(1, "w", "10.0.0.2", "worker", "joining", 0, 0),))


def test_a_parameter_server_in_a_train_frame_is_refused() -> None:
    """However well formed its address, a ``ps`` job is not part of any cluster any more."""
    frame = {"type": "train", "cluster": {"ps": ["127.0.0.1:27002"], **CLUSTER}, "index": 1}
    with pytest.raises(wire.WireError) as exc:
        sp.check_host_frame(frame)
    assert exc.value.field == "cluster" and exc.value.code == wire.ErrorCode.BAD_FIELD
    assert "worker" in str(exc.value)
    got = sp.check_host_frame({"type": "train", "cluster": CLUSTER, "index": 1})
    assert isinstance(got, sp.Train) and set(got.cluster) == {"worker"}


def test_expelled_is_a_member_state() -> None:
    assert "expelled" in sp.MEMBER_STATES
    assert sp.check_worker_frame({"type": "state", "state": "expelled"}) == sp.StateReport("expelled")


def test_a_member_note_round_trips_and_is_left_out_when_empty() -> None:
    why = "3 of its last 4 changes were rejected (most pointed away from the host's own training)"
    view = sp.MemberView(2, "w2", "10.0.0.3", "worker", "expelled", 10, 10, why)
    assert view.to_dict()["note"] == why
    got = sp.check_host_frame(over_the_wire(sp.MembersUpdate((view,)).to_frame()))
    assert got == sp.MembersUpdate((view,))
    plain = sp.MemberView(1, "w1", "10.0.0.2", "worker", "training", 1, 1)
    assert "note" not in plain.to_dict()
    assert sp.MemberView.from_dict(plain.to_dict(), "members[0]").note == ""


def test_a_member_note_is_sanitized_and_capped() -> None:
    """A note is shown to the user: control characters (terminal escapes, newlines) go, and it
    is cut at NOTE_MAX characters."""
    d = sp.MemberView(2, "w2", "10.0.0.3", "worker", "expelled").to_dict()
    d["note"] = "bad\x1b[2J\nchanges\x00\u202e" + "y" * 1000
    got = sp.check_host_frame(over_the_wire({"type": "members", "members": [d]}))
    assert isinstance(got, sp.MembersUpdate)
    note = got.members[0].note
    assert note.startswith("bad[2Jchanges") and len(note) == sp.NOTE_MAX
    assert note.isprintable() and set(note[len("bad[2Jchanges"):]) == {"y"}

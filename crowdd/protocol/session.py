"""The group session's messages (after the matchmaker), used by the host and its workers.

worker → host: :class:`StateReport`, :class:`ReplicationReport`, :class:`Ready`, :class:`JobReport`,
:class:`Away` (the volunteer's machine is busy: the worker leaves politely) and :class:`Back`.
host → worker: :class:`MembersUpdate`, :class:`Train`, :class:`TrainingEvent`, :class:`End`.
Both ways: ``ping`` (heartbeats, handled by the channel). Each message turns into its frame
with ``to_frame()``; :func:`check_worker_frame` and :func:`check_host_frame` check what arrives
and return the typed message, or raise :class:`wire.WireError` naming the bad field.

The host's job events travel as :class:`TrainingEvent` with the job's own ``event`` key
(``progress``, ``eval``) kept end to end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from crowdd import wire
from crowdd.protocol import fields
from crowdd.errors import ErrorCode
from crowdd.text import plain

#: What a member may report about itself (and what the host shows per member).
MEMBER_STATES = ("joining", "replicating", "ready", "training", "away", "finished", "gone", "expelled")
#: the longest note (why a member was expelled) a member view carries
NOTE_MAX = 200
#: Job events the host fans out to its workers.
TRAINING_EVENTS = ("progress", "eval")
#: Frames a congested channel may drop (newer ones follow).
DROPPABLE = frozenset({"training", "members", "replication", "ping", "state"})












# --------------------------------------------------------------------------- worker → host


@dataclass(frozen=True)
class StateReport:
    state: str

    def to_frame(self) -> dict[str, Any]:
        return {"type": "state", "state": self.state}


@dataclass(frozen=True)
class ReplicationReport:
    done: int
    total: int
    source: int | None = None

    def to_frame(self) -> dict[str, Any]:
        return {"type": "replication", "done": self.done, "total": self.total, "source": self.source}


@dataclass(frozen=True)
class Ready:
    """The worker holds the dataset, verified against the manifest."""

    def to_frame(self) -> dict[str, Any]:
        return {"type": "ready"}


@dataclass(frozen=True)
class JobReport:
    """The worker's TF server ``started``, or ``exited`` (with its code and last error)."""

    event: str
    code: int | None = None
    message: str | None = None

    def to_frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "job", "event": self.event}
        if self.event == "exited":
            frame.update(code=self.code, message=self.message)
        return frame


@dataclass(frozen=True)
class Away:
    """The worker's machine is busy (its idle policy said no): it stops training now, before
    it suspends its job (``staying``: it comes back when idle again) or leaves the session. The
    host takes it out of training at once, so the others carry on without waiting for it."""

    reason: str
    staying: bool = True

    def to_frame(self) -> dict[str, Any]:
        return {"type": "away", "reason": self.reason, "staying": self.staying}


@dataclass(frozen=True)
class Back:
    """The worker is idle again after :class:`Away` (its TF server kept its state)."""

    def to_frame(self) -> dict[str, Any]:
        return {"type": "back"}


WorkerMessage = Union[StateReport, ReplicationReport, Ready, JobReport, Away, Back]


def check_worker_frame(frame: Mapping[str, Any]) -> WorkerMessage:
    kind = frame.get("type")
    if kind == "state":
        state = frame.get("state")
        if state not in MEMBER_STATES:
            raise fields.bad("state", f"field 'state' must be one of {', '.join(MEMBER_STATES)}, got {state!r}")
        return StateReport(str(state))
    if kind == "replication":
        done, total = fields.integer(frame, "done"), fields.integer(frame, "total")
        if done > total:
            raise fields.bad("done", f"done ({done}) exceeds total ({total})")
        return ReplicationReport(done, total, fields.opt_integer(frame, "source"))
    if kind == "ready":
        return Ready()
    if kind == "job":
        event = frame.get("event")
        if event == "started":
            return JobReport("started")
        if event == "exited":
            return JobReport("exited", fields.opt_integer(frame, "code", lo=-255), fields.opt_words(frame, "message"))
        raise fields.bad("event", f"field 'event' must be started or exited, got {event!r}")
    if kind == "away":
        reason = fields.opt_words(frame, "reason", limit=500)
        staying = frame.get("staying", True)
        if not isinstance(staying, bool):
            raise fields.bad("staying", "field 'staying' must be true or false")
        return Away(reason or "busy", staying)
    if kind == "back":
        return Back()
    raise wire.WireError(ErrorCode.UNKNOWN_TYPE, f"unexpected frame {kind!r} from a worker")


# --------------------------------------------------------------------------- host → worker


@dataclass(frozen=True)
class MemberView:
    """One member as the host shows it to the group."""

    index: int
    name: str
    address: str
    role: str
    state: str
    done: int = 0
    total: int = 0
    note: str = ""  # why the host expelled it (state "expelled")

    def to_dict(self) -> dict[str, Any]:
        out = {"index": self.index, "name": self.name, "address": self.address, "role": self.role,
               "state": self.state, "replication": {"done": self.done, "total": self.total}}
        if self.note:
            out["note"] = self.note
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str) -> MemberView:
        if not isinstance(d, dict):
            raise fields.bad(where, f"{where} must be an object")
        rep: dict[str, Any] = d["replication"] if isinstance(d.get("replication"), dict) else {"done": 0, "total": 0}
        state = d.get("state")
        if state not in MEMBER_STATES:
            raise fields.bad(f"{where}.state", f"unknown member state {state!r}")
        name, address, role = d.get("name"), d.get("address"), d.get("role")
        if not all(isinstance(x, str) for x in (name, address, role)):
            raise fields.bad(where, f"{where} needs string name, address and role")
        note = d.get("note", "")
        if not isinstance(note, str):
            raise fields.bad(f"{where}.note", f"{where}.note must be a string")
        note = plain(note, NOTE_MAX)
        return cls(fields.integer(d, "index"), plain(str(name)), str(address), str(role), str(state),
                   fields.integer(rep, "done"), fields.integer(rep, "total"), note)


@dataclass(frozen=True)
class MembersUpdate:
    members: tuple[MemberView, ...]

    def to_frame(self) -> dict[str, Any]:
        return {"type": "members", "members": [m.to_dict() for m in self.members]}


@dataclass(frozen=True)
class Train:
    """Start your TF server: the cluster (``worker`` addresses) and your task index."""

    cluster: dict[str, list[str]]
    index: int

    def to_frame(self) -> dict[str, Any]:
        return {"type": "train", "cluster": self.cluster, "index": self.index}


@dataclass(frozen=True)
class Dial:
    """Open tunnel stream ``stream`` back to the host and connect it to your TF task ``task``
    (the host's coordinator reaches a worker's TF server through the worker's outbound dial)."""

    stream: int
    task: int

    def to_frame(self) -> dict[str, Any]:
        return {"type": "dial", "stream": self.stream, "task": self.task}


@dataclass(frozen=True)
class TrainingEvent:
    """One of the host job's events (its own ``event`` key kept), fanned out to the group."""

    event: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> dict[str, Any]:
        return {**self.event, "type": "training"}


@dataclass(frozen=True)
class End:
    """The session is over: its result, or why it failed."""

    test_accuracy: float | None = None
    model_path: str | None = None
    error: str | None = None

    def to_frame(self) -> dict[str, Any]:
        return {"type": "end", "test_accuracy": self.test_accuracy, "model_path": self.model_path, "error": self.error}


HostMessage = Union[MembersUpdate, Train, Dial, TrainingEvent, End]

#: Every TF address in a cluster is a port on each member's own private loopback
#: (:mod:`crowdd.job.confine`); the tunnels carry it to the member that serves it.
PRIVATE_HOST = "127.0.0.1"


def _cluster(value: Any) -> dict[str, list[str]]:
    if not isinstance(value, dict) or set(value) - {"worker"}:
        raise fields.bad("cluster", "field 'cluster' must be an object with one worker address list")
    out: dict[str, list[str]] = {}
    for job, addrs in value.items():
        if not isinstance(addrs, list) or not all(isinstance(a, str) and _private(a) for a in addrs):
            raise fields.bad(f"cluster.{job}", f"field 'cluster.{job}' must be a list of {PRIVATE_HOST}:PORT strings")
        out[job] = list(addrs)
    if not out.get("worker"):
        raise fields.bad("cluster", "the cluster needs at least one worker")
    return out


def _private(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return host == PRIVATE_HOST and port.isdigit() and 1 <= int(port) <= 65535 and str(int(port)) == port


def check_host_frame(frame: Mapping[str, Any]) -> HostMessage:
    kind = frame.get("type")
    if kind == "members":
        members = frame.get("members")
        if not isinstance(members, list):
            raise fields.bad("members", "field 'members' must be a list")
        return MembersUpdate(tuple(MemberView.from_dict(m, f"members[{i}]") for i, m in enumerate(members)))
    if kind == "train":
        cluster = _cluster(frame.get("cluster"))
        index = fields.integer(frame, "index", lo=1)
        if index >= len(cluster["worker"]):
            raise fields.bad("index", f"worker index {index} outside the cluster")
        return Train(cluster, index)
    if kind == "dial":
        return Dial(fields.integer(frame, "stream"), fields.integer(frame, "task", lo=1))
    if kind == "training":
        if frame.get("event") not in TRAINING_EVENTS:
            raise fields.bad("event", f"field 'event' must be one of {', '.join(TRAINING_EVENTS)}")
        return TrainingEvent({k: v for k, v in frame.items() if k != "type"})
    if kind == "end":
        return End(fields.opt_number(frame, "test_accuracy"), fields.opt_words(frame, "model_path"), fields.opt_words(frame, "error"))
    raise wire.WireError(ErrorCode.UNKNOWN_TYPE, f"unexpected frame {kind!r} from the host")


__all__ = [
    "DROPPABLE", "MEMBER_STATES", "PRIVATE_HOST", "TRAINING_EVENTS", "Away", "Back", "Dial", "End", "HostMessage", "JobReport", "MemberView",
    "MembersUpdate", "Ready", "ReplicationReport", "StateReport", "Train", "TrainingEvent", "WorkerMessage",
    "check_host_frame", "check_worker_frame",
]

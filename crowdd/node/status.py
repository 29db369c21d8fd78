"""What a node reports: a projection of the state authority (the daemon's
:class:`~crowdd.node.states.StateMachine`) and the current session — the control socket's
``status`` and the events that keep subscribers current.

The view never owns state. Fields of a session (its queue place, plan, members, progress,
result) live in a :class:`SessionRecord` that exists from the start of a cycle to its
teardown; :meth:`StatusView.status` shows each only in the states where it is true, so status
can never show a queue place while training, training after the session ended, or the last
run's result as the current one. Member lists and training progress are rate-limited here so
a flood of updates never floods the subscribers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from crowdd import __version__
from crowdd.hyperparams import Job
from crowdd.idle.policy import Verdict
from crowdd.node.states import State, StateMachine
from crowdd.plan import SessionPlan
from crowdd.platform.systemd import Notifier
from crowdd.protocol.control import GroupStatus, QueueStatus, ResultStatus, Status, TensorflowStatus
from crowdd.protocol.matchmaker import Wait

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.25  # at most this often: replication reports, members broadcasts
S = State
DONATION_OFF = Verdict(False, None, "donation is off")
CHECKING = Verdict(False, None, "checking the idle policy")
_IN_GROUP = (S.REPLICATING, S.TRAINING, S.FINISHED)


class MemberFanout(Protocol):
    """The host's session as the view sees it: the member list, and a push to the workers."""

    def member_dicts(self) -> list[dict[str, Any]]: ...

    def push_members(self) -> None: ...


@dataclass
class SessionRecord:
    """One cycle of this node (a host leading or a worker following), from start to teardown."""

    role: str
    job: Job | None = None
    dataset: dict[str, Any] | None = None
    queue: Wait | None = None
    plan: SessionPlan | None = None
    members: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] | None = None
    sps: dict[int, float] = field(default_factory=dict)
    result: ResultStatus | None = None
    error: str | None = None


class StatusView:
    """A node's reported status. ``publish(kind, **fields)`` sends one control event."""

    def __init__(self, name: str, states: StateMachine, publish: Callable[..., None], notifier: Notifier) -> None:
        self.name = name
        self._states = states
        self._publish = publish
        self._notifier = notifier
        self.donating = False
        self.verdict = DONATION_OFF
        self.paused_until: float | None = None  # the user's pause (epoch seconds), set by the daemon
        self.tensorflow: TensorflowStatus = {
            "confined": True, "sandboxed": True, "landlock_abi": 0, "allowed": True, "reason": "",
        }
        self.session: SessionRecord | None = None
        self.last: SessionRecord | None = None
        self._last_members_push = 0.0
        self._members_pending: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ state and events

    @property
    def state(self) -> State:
        return self._states.state

    @property
    def role(self) -> str | None:
        return self.session.role if self.session is not None else None

    def publish(self, kind: str, **fields: Any) -> None:
        self._publish(kind, **fields)

    def log(self, level: int, message: str) -> None:
        logger.log(level, "%s", message)
        self._publish("log", level=logging.getLevelName(level).lower(), message=message)

    def on_transition(self, old: State, new: State) -> None:
        """The state authority moved: log it, tell subscribers and systemd."""
        logger.info("%s: state %s -> %s", self.name, old.value, new.value)
        self._publish("state", state=new.value, previous=old.value)
        self._notifier.status(self.status_line())

    def status_line(self) -> str:
        role = f" ({self.role})" if self.role else ""
        return f"{self.state.value}{role}, donation {'on' if self.donating else 'off'}"

    def set_donating(self, on: bool) -> None:
        self.donating = on
        self.verdict = CHECKING if on else DONATION_OFF

    def status(self) -> Status:
        st = self.state
        cur = self.session
        # Between sessions the last one's job, dataset, result and error stay on show (what it
        # ended with); from the start of the next cycle only that cycle's fields do.
        shown = cur if cur is not None else self.last
        plan = shown.plan if shown is not None else None
        v = self.verdict if self.donating else DONATION_OFF
        paused_until = self.paused_until if self.paused_until is not None and self.paused_until > time.time() else None
        group: GroupStatus | None = None
        if cur is not None and plan is not None and st in _IN_GROUP:
            group = {"id": plan.group_id, "index": plan.index, "members": cur.members}
        job = plan.job if plan is not None else (shown.job if shown is not None else None)
        dataset = plan.dataset.to_dict() if plan is not None else (shown.dataset if shown is not None else None)
        queue: QueueStatus | None = None
        if cur is not None and cur.queue is not None and st == S.WAITING:
            queue = {"position": cur.queue.position, "hosts": cur.queue.hosts, "workers": cur.queue.workers}
        result: ResultStatus | None
        if cur is not None:
            result = cur.result if st == S.FINISHED else None
            error = cur.error
        else:  # between sessions: what the last one ended with
            result = self.last.result if self.last is not None else None
            error = self.last.error if self.last is not None else None
        return {
            "version": __version__,
            "name": self.name,
            "state": st.value,
            "donating": self.donating,
            "role": self.role,
            "idle": {"allowed": v.allowed, "rule": v.rule, "reason": v.reason, "paused_until": paused_until},
            "tensorflow": {**self.tensorflow},
            "queue": queue,
            "group": group,
            "job": job.to_dict() if job is not None else None,
            "settings": plan.settings.to_dict() if plan is not None else None,
            "dataset": dataset,
            "training": cur.training if cur is not None and st in (S.TRAINING, S.FINISHED) else None,
            "result": result,
            "error": error,
        }

    # ------------------------------------------------------------------ a session's life

    def begin(self, role: str) -> SessionRecord:
        """A cycle starts: a fresh record (the last session's result and error stop showing)."""
        self.session = SessionRecord(role)
        return self.session

    def joined(self, plan: SessionPlan) -> None:
        """The matchmaker's ``group`` frame arrived: report the group and its members."""
        rec = self._current()
        rec.plan = plan
        rec.queue = None
        rec.members = [
            {**m.to_dict(), "state": "joining", "replication": {"done": 0, "total": 0}} for m in plan.members
        ]
        for m in rec.members:
            m.pop("ports", None)

    def on_wait(self, wait: Wait) -> None:
        """A ``wait`` frame from the matchmaker: the node's place in the queue."""
        self._current().queue = wait
        self._current().error = None  # the matchmaker answers
        if self.state != S.WAITING:
            self._states.to(S.WAITING)
        self._publish("status", **self.status())

    def fail(self, message: str) -> None:
        """The current session failed; the message is what the user sees as ``error``."""
        self._current().error = message

    def problem(self, message: str | None) -> None:
        """What keeps the current session from going on right now (the matchmaker cannot be
        reached, …), shown as ``error`` until it clears (``None``); publishes the status."""
        rec = self._current()
        if rec.error != message:
            rec.error = message
            self._publish("status", **self.status())

    def end(self) -> None:
        """The cycle is over: the record becomes the last session (its result and error)."""
        if self._members_pending is not None:
            self._members_pending.cancel()
            self._members_pending = None
        if self.session is not None:
            self.last = self.session
        self.session = None

    def _current(self) -> SessionRecord:
        if self.session is None:
            raise RuntimeError("no session is running")  # a daemon bug, never user input
        return self.session

    # ------------------------------------------------------------------ progress plumbing

    def set_member(self, index: int, **fields: Any) -> None:
        for m in self._current().members:
            if m.get("index") == index:
                m.update(fields)

    def set_members(self, members: list[dict[str, Any]]) -> None:
        """The host's member list arrived (a worker): report it."""
        self._current().members = members
        self._publish("members", members=members)

    def push_members(self, session: MemberFanout | None = None, *, now: bool = False) -> None:
        """Publish (and, as host, fan out) the member list, at most every PROGRESS_INTERVAL."""
        loop = asyncio.get_running_loop()
        wait = self._last_members_push + PROGRESS_INTERVAL - loop.time()
        if not now and wait > 0:
            if self._members_pending is None:
                self._members_pending = loop.call_later(wait, self._push_members_now, session)
            return
        self._push_members_now(session)

    def _push_members_now(self, session: MemberFanout | None) -> None:
        self._members_pending = None
        self._last_members_push = asyncio.get_running_loop().time()
        rec = self.session
        if rec is None:
            return
        if session is not None:
            rec.members = session.member_dicts()
            session.push_members()
        self._publish("members", members=rec.members)

    def worker_left(self, worker: int) -> None:
        """Training slot ``worker`` left: its rate no longer counts in the group's samples/s."""
        rec = self._current()
        if rec.sps.pop(worker, None) is not None and rec.training is not None:
            rec.training["samples_per_sec"] = round(sum(rec.sps.values()), 1)

    def on_training_event(self, ev: dict[str, Any]) -> None:
        """One of the host job's events (``event``: ``progress`` or ``eval``)."""
        rec = self._current()
        kind = ev.get("event")
        tr = rec.training or {
            "epoch": 0, "epochs": rec.plan.job.epochs if rec.plan else None, "step": 0, "loss": None,
            "accuracy": None, "test_accuracy": None, "samples_per_sec": None,
        }
        if kind == "progress":
            for k in ("epoch", "epochs", "step", "loss", "accuracy", "mae"):
                if k in ev:
                    tr[k] = ev[k]
            if isinstance(ev.get("samples_per_sec"), (int, float)):
                rec.sps[int(ev.get("worker") or 0)] = float(ev["samples_per_sec"])
                tr["samples_per_sec"] = round(sum(rec.sps.values()), 1)
            rec.training = tr
            self._publish("progress", **{k: tr.get(k) for k in ("epoch", "epochs", "step", "loss", "accuracy", "samples_per_sec")},
                          total_steps=ev.get("total_steps"), worker=ev.get("worker"))
        elif kind == "eval":
            tr["test_accuracy"] = ev.get("test_accuracy")
            extra: dict[str, Any] = {k: ev[k] for k in ("test_mae", "test_mse") if k in ev}
            tr.update(extra)
            rec.training = tr
            clock = {k: ev[k] for k in ("train_seconds", "eval_seconds") if k in ev}  # time-to-accuracy
            self._publish("eval", epoch=ev.get("epoch"), step=ev.get("step"), test_accuracy=ev.get("test_accuracy"),
                          test_loss=ev.get("test_loss"), **extra, **clock)

    def finished(self, test_accuracy: Any, model_path: str | None, *, model_sha256: str | None = None,
                 **metrics: float) -> None:
        """The session's result (``model_path`` is this node's own file, ``model_sha256`` its
        digest when the job ended; a worker has neither): report it, then the caller moves the
        state authority to FINISHED."""
        rec = self._current()
        rec.result = {"test_accuracy": test_accuracy, "model_path": model_path}
        if model_sha256:
            rec.result["model_sha256"] = model_sha256
        for key in ("test_mae", "test_mse"):
            if key in metrics:
                rec.result[key] = metrics[key]  # type: ignore[literal-required]
        if rec.training is not None:
            rec.training["test_accuracy"] = test_accuracy
        self._publish("result", **rec.result)


__all__ = ["PROGRESS_INTERVAL", "MemberFanout", "SessionRecord", "StatusView"]

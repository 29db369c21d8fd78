"""What a node reports: its state, role, queue place, group, job, training progress and
result — the control socket's ``status`` and the events that keep subscribers current.

The daemon and its session flows write here; every change becomes a control event (and the
state line an sd_notify ``STATUS=``). Member lists and training progress are merged and
rate-limited here so a flood of updates never floods the subscribers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from crowdd import __version__
from crowdd.idle import Verdict
from crowdd.node.states import InvalidTransition, State, StateMachine
from crowdd.systemd import Notifier

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.25  # at most this often: replication reports, members broadcasts


class MemberFanout(Protocol):
    """The host's session as the view sees it: the member list, and a broadcast."""

    def member_dicts(self) -> list[dict[str, Any]]: ...

    def broadcast(self, msg: dict[str, Any]) -> None: ...


class StatusView:
    """A node's reported status. ``publish(kind, **fields)`` sends one control event."""

    def __init__(self, name: str, publish: Callable[..., None], notifier: Notifier) -> None:
        self.name = name
        self._publish = publish
        self._notifier = notifier
        self._sm = StateMachine(self._on_transition)
        self.donating = False
        self.verdict = Verdict(False, None, "donation is off")
        self.role: str | None = None
        self.queue: dict[str, Any] | None = None
        self.group: dict[str, Any] | None = None
        self.members: list[dict[str, Any]] = []
        self.job: dict[str, Any] | None = None
        self.dataset: dict[str, Any] | None = None
        self.training: dict[str, Any] | None = None
        self._sps: dict[int, float] = {}
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self._last_members_push = 0.0
        self._members_pending: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ state and events

    @property
    def state(self) -> State:
        return self._sm.state

    def to(self, new: State) -> None:
        try:
            self._sm.to(new)
        except InvalidTransition as exc:
            logger.error("internal: refused state transition %s", exc)

    def publish(self, kind: str, **fields: Any) -> None:
        self._publish(kind, **fields)

    def log(self, level: int, message: str) -> None:
        logger.log(level, "%s", message)
        self._publish("log", level=logging.getLevelName(level).lower(), message=message)

    def _on_transition(self, old: State, new: State) -> None:
        logger.info("%s: state %s -> %s", self.name, old.value, new.value)
        self._publish("state", state=new.value, previous=old.value)
        self._notifier.status(self.status_line())

    def status_line(self) -> str:
        role = f" ({self.role})" if self.role else ""
        return f"{self.state.value}{role}, donation {'on' if self.donating else 'off'}"

    def status(self) -> dict[str, Any]:
        group = None
        if self.group is not None:
            group = {"id": self.group.get("group_id"), "index": self.group.get("index"), "members": self.members}
        v = self.verdict
        return {
            "version": __version__,
            "name": self.name,
            "state": self.state.value,
            "donating": self.donating,
            "role": self.role,
            "idle": {"allowed": v.allowed, "rule": v.rule, "reason": v.reason},
            "queue": self.queue,
            "group": group,
            "job": self.job,
            "dataset": self.dataset,
            "training": self.training,
            "result": self.result,
            "error": self.error,
        }

    # ------------------------------------------------------------------ a session's life

    def joined(self, group: dict[str, Any]) -> None:
        """The matchmaker's ``group`` frame arrived: report the group and its members."""
        self.group = group
        self.members = [dict(m, state="joining", replication={"done": 0, "total": 0}) for m in group["members"]]
        self.job = dict(group.get("job") or {})
        self.dataset = dict(group.get("dataset") or {})

    def on_wait(self, frame: dict[str, Any]) -> None:
        """A ``wait`` frame from the matchmaker: the node's place in the queue."""
        self.queue = {"position": frame.get("position"), "hosts": frame.get("hosts"), "workers": frame.get("workers")}
        if self.state != State.WAITING:
            self.to(State.WAITING)
        self._publish("status", **self.status())

    def clear_session(self) -> None:
        """The cycle is over: forget the session's details (the result and error stay)."""
        if self._members_pending is not None:
            self._members_pending.cancel()
            self._members_pending = None
        self.role = None
        self.queue = None
        self.group = None
        self.members = []
        self.training = None
        self._sps = {}

    # ------------------------------------------------------------------ progress plumbing

    def set_member(self, index: int, **fields: Any) -> None:
        for m in self.members:
            if m.get("index") == index:
                m.update(fields)

    def set_members(self, members: list[dict[str, Any]]) -> None:
        """The host's member list arrived (a worker): report it."""
        self.members = members
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
        if session is not None:
            self.members = session.member_dicts()
            session.broadcast({"type": "members", "members": self.members})
        self._publish("members", members=self.members)

    def on_training_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event") or ev.get("type")
        tr = self.training or {
            "epoch": 0, "epochs": (self.job or {}).get("epochs"), "step": 0, "loss": None,
            "accuracy": None, "test_accuracy": None, "samples_per_sec": None,
        }
        if kind == "progress":
            for k in ("epoch", "epochs", "step", "loss", "accuracy"):
                if k in ev:
                    tr[k] = ev[k]
            if isinstance(ev.get("samples_per_sec"), (int, float)):
                self._sps[int(ev.get("worker") or 0)] = float(ev["samples_per_sec"])
                tr["samples_per_sec"] = round(sum(self._sps.values()), 1)
            self.training = tr
            self._publish("progress", **{k: tr.get(k) for k in ("epoch", "epochs", "step", "loss", "accuracy", "samples_per_sec")},
                          total_steps=ev.get("total_steps"), worker=ev.get("worker"))
        elif kind == "eval":
            tr["test_accuracy"] = ev.get("test_accuracy")
            self.training = tr
            self._publish("eval", epoch=ev.get("epoch"), step=ev.get("step"), test_accuracy=ev.get("test_accuracy"),
                          test_loss=ev.get("test_loss"))

    def finished(self, test_accuracy: Any, model_path: Any) -> None:
        """The session's result: report it, move to FINISHED, publish a ``result`` event."""
        self.result = {"test_accuracy": test_accuracy, "model_path": model_path}
        self.to(State.FINISHED)
        self._publish("result", **self.result)


__all__ = ["PROGRESS_INTERVAL", "StatusView", "MemberFanout"]

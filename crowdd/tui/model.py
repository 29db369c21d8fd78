"""What the TUI shows, folded from status replies and events (no textual, no I/O).

:class:`DaemonView` keeps the last known daemon status and the loss / test-accuracy
history for the plot. :meth:`DaemonView.apply_event` folds one control-socket event in
and returns the line (level, text) the log pane should show for it, if any.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from crowdd.protocol.control import format_pause

STATES = ("off", "standby", "registering", "waiting", "replicating", "training", "finished")
HISTORY = 240

STATE_HELP = {
    "off": "donation is off",
    "standby": "waiting for the machine to be idle",
    "registering": "contacting the matchmaker",
    "waiting": "queued at the matchmaker",
    "replicating": "copying the dataset",
    "training": "training",
    "finished": "session finished",
}


@dataclass
class Member:
    index: int
    name: str
    role: str
    state: str
    done: int
    total: int
    note: str = ""  # why the host expelled it (state "expelled")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Member:
        raw = d.get("replication")
        rep: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        return cls(
            index=_int(d.get("index"), 0),
            name=str(d.get("name") or d.get("address") or f"node {d.get('index', '?')}"),
            role=str(d.get("role") or ("host" if d.get("index") == 0 else "worker")),
            state=str(d.get("state") or "?"),
            done=_int(rep.get("done"), 0),
            total=_int(rep.get("total"), 0),
            note="".join(c for c in str(d.get("note") or "") if c.isprintable()),
        )


def _int(v: Any, default: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return default
    return int(v)


def _float(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


@dataclass
class DaemonView:
    """The daemon as last seen; every field has a harmless default before the first status."""

    connected: bool = False
    version: str = ""
    state: str = "off"
    donating: bool = False
    role: str | None = None
    idle_allowed: bool | None = None
    idle_rule: str | None = None
    idle_reason: str = ""
    paused_until: float | None = None  # the user's pause (epoch seconds)
    tf_confined: bool = True
    tf_sandboxed: bool = True
    tf_allowed: bool = True
    tf_reason: str = ""
    queue_position: int | None = None
    group_id: str | None = None
    members: list[Member] = field(default_factory=list)
    job: dict[str, Any] | None = None
    dataset: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    loss: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    test_accuracy: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))

    # ------------------------------------------------------------------ status replies

    def apply_status(self, status: Mapping[str, Any]) -> None:
        self.version = str(status.get("version") or self.version)
        state = status.get("state")
        if isinstance(state, str):
            self.state = state
        self.donating = bool(status.get("donating", self.donating))
        role = status.get("role")
        self.role = role if isinstance(role, str) else None
        idle = status.get("idle")
        if isinstance(idle, Mapping):
            self.idle_allowed = bool(idle.get("allowed"))
            rule = idle.get("rule")
            self.idle_rule = rule if isinstance(rule, str) else None
            self.idle_reason = str(idle.get("reason") or "")
            self.paused_until = _float(idle.get("paused_until"))
        tf = status.get("tensorflow")
        if isinstance(tf, Mapping):
            self.tf_confined = tf.get("confined") is not False
            self.tf_sandboxed = tf.get("sandboxed") is not False
            self.tf_allowed = tf.get("allowed") is not False
            self.tf_reason = str(tf.get("reason") or "")
        queue = status.get("queue")
        self.queue_position = _int(queue.get("position"), 0) if isinstance(queue, Mapping) else None
        group = status.get("group")
        if isinstance(group, Mapping):
            self.group_id = str(group.get("id")) if group.get("id") is not None else None
            self._set_members(group.get("members"))
        else:
            self.group_id = None
            self.members = []
        job = status.get("job")
        self.job = dict(job) if isinstance(job, Mapping) else None
        dataset = status.get("dataset")
        self.dataset = dict(dataset) if isinstance(dataset, Mapping) else None
        training = status.get("training")
        self.training = dict(training) if isinstance(training, Mapping) else {}
        if self.training:
            loss = _float(self.training.get("loss"))
            if loss is not None and not self.loss:
                self.loss.append(loss)
            acc = _float(self.training.get("test_accuracy"))
            if acc is not None and not self.test_accuracy:
                self.test_accuracy.append(acc)
        result = status.get("result")
        self.result = dict(result) if isinstance(result, Mapping) else None
        err = status.get("error")
        self.error = str(err) if err else None

    def _set_members(self, members: Any) -> None:
        if isinstance(members, list):
            self.members = [Member.from_dict(m) for m in members if isinstance(m, Mapping)]
            self.members.sort(key=lambda m: m.index)

    # ------------------------------------------------------------------ events

    def apply_event(self, event: Mapping[str, Any]) -> tuple[str, str] | None:
        """Fold one event in; return (level, text) for the log pane, or None."""
        kind = event.get("event")
        if kind == "state":
            new = str(event.get("state", self.state))
            previous = event.get("previous")
            self.state = new
            if new == "off":
                self.donating = False
            elif new == "standby" and previous == "off":
                self.donating = True
            if new in ("standby", "off"):
                self.queue_position = None
            if new == "training" and previous != "training":
                self.loss.clear()
                self.test_accuracy.clear()
            return "info", f"state {previous or '?'} → {new}"
        if kind == "replication":
            index = _int(event.get("index"), -1)
            done, total = _int(event.get("done"), 0), _int(event.get("total"), 0)
            for m in self.members:
                if m.index == index:
                    m.done, m.total = done, total
            if total and done >= total:
                return "info", f"node {index} holds the dataset ({total} chunks)"
            return None
        if kind == "progress":
            for key in ("epoch", "epochs", "step", "loss", "accuracy", "samples_per_sec"):
                if key in event:
                    self.training[key] = event[key]
            loss = _float(event.get("loss"))
            if loss is not None:
                self.loss.append(loss)
            return None
        if kind == "eval":
            acc = _float(event.get("test_accuracy"))
            if acc is not None:
                self.test_accuracy.append(acc)
                self.training["test_accuracy"] = acc
                return "info", f"epoch {event.get('epoch', '?')}: test accuracy {acc:.4f}"
            return None
        if kind == "members":
            self._set_members(event.get("members"))
            return "info", f"group has {len(self.members)} members"
        if kind == "result":
            acc = _float(event.get("test_accuracy"))
            self.result = {"test_accuracy": acc, "model_path": event.get("model_path")}
            shown = f"{acc:.4f}" if acc is not None else "?"
            return "info", f"training finished: test accuracy {shown}"
        if kind == "log":
            return str(event.get("level") or "info"), str(event.get("message") or "")
        if kind == "status":
            full = event.get("status")
            self.apply_status(full if isinstance(full, Mapping) else event)
            return None
        return None

    # ------------------------------------------------------------------ derived text

    @property
    def paused(self) -> bool:
        return self.paused_until is not None and self.paused_until > time.time()

    def pause_text(self, now: float | None = None) -> str:
        """``paused until 14:30 (1 h 59 min left)``, or "" when not paused."""
        return format_pause(self.paused_until, now) if self.paused_until is not None and self.paused else ""

    @property
    def idle_text(self) -> str:
        if self.paused:
            return f"{self.pause_text()} (p: resume)"
        if not self.tf_allowed:
            return f"not training: {self.tf_reason or 'TensorFlow cannot be confined or sandboxed here'}"
        if self.idle_allowed is None:
            return "unknown"
        verdict = "idle, may work" if self.idle_allowed else "busy, not working"
        reason = self.idle_reason or (self.idle_rule or "")
        text = f"{verdict}: {reason}" if reason else verdict
        if not self.tf_confined:
            text = f"{text} · TensorFlow EXPOSED (allow_exposed_tensorflow)"
        if not self.tf_sandboxed:
            text = f"{text} · TensorFlow UNSANDBOXED (allow_unsandboxed)"
        return text

    @property
    def role_text(self) -> str:
        role = self.role or "none"
        if self.queue_position is not None:
            role += f" (queue position {self.queue_position})"
        return role

    @property
    def dataset_text(self) -> str:
        if not self.dataset:
            return "none"
        name = str(self.dataset.get("name") or "?")
        size = _int(self.dataset.get("size"), -1)
        return f"{name} ({human_size(size)})" if size >= 0 else name


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - loop always returns


__all__ = ["STATES", "STATE_HELP", "DaemonView", "Member", "human_size"]

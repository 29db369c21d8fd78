"""The one fake in the TUI tests: an in-memory :class:`~crowdd.client.daemon_client.DaemonClient`.

It keeps a status dict, answers requests the way the control socket does, and feeds
events from an :class:`asyncio.Queue` to :meth:`subscribe`. ``go_down()`` makes every
call fail with :class:`Unavailable` (and ends the subscription) until
``come_back()``.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator
from typing import Any

from crowdd.errors import ErrorCode, InputError, RemoteError, Unavailable
from crowdd.hyperparams import HyperparamError, validate_job
from crowdd.protocol.control import check_pause

_END = {"type": "__end__"}


def base_status(**overrides: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "type": "status",
        "version": "0.1.0",
        "name": "alice",
        "state": "off",
        "donating": False,
        "role": None,
        "idle": {"allowed": True, "rule": None, "reason": "user idle for 12 min", "paused_until": None},
        "tensorflow": {"confined": True, "sandboxed": True, "landlock_abi": 7, "allowed": True, "reason": ""},
        "queue": None,
        "group": None,
        "job": None,
        "settings": None,
        "dataset": None,
        "training": None,
        "result": None,
        "error": None,
    }
    status.update(overrides)
    return status


def training_status() -> dict[str, Any]:
    """A host mid-training in a group of four (fixed numbers, for snapshots)."""
    members = [
        {"index": 0, "name": "alice", "address": "10.0.0.1:7701", "role": "host", "state": "training",
         "replication": {"done": 12, "total": 12}},
        {"index": 1, "name": "bob", "address": "10.0.0.2:7701", "role": "worker", "state": "training",
         "replication": {"done": 12, "total": 12}},
        {"index": 2, "name": "carol", "address": "10.0.0.3:7701", "role": "worker", "state": "replicating",
         "replication": {"done": 7, "total": 12}},
        {"index": 3, "name": "dave", "address": "10.0.0.4:7701", "role": "worker", "state": "replicating",
         "replication": {"done": 2, "total": 12}},
    ]
    return base_status(
        state="training",
        donating=True,
        role="host",
        group={"id": "g-42", "index": 0, "members": members},
        job={"model": "mlp", "hidden": [100], "optimizer": "sgd", "learning_rate": 0.5, "batch_size": 100,
             "epochs": 3, "workers": 3, "min_workers": 1, "wait": 60.0, "sharding": "full",
             "loss": "sparse_categorical_crossentropy"},
        dataset={"name": "fashion-mnist", "size": 55_180_000, "digest": "ab" * 32},
        training={"epoch": 2, "epochs": 3, "step": 1200, "loss": 0.4321, "accuracy": 0.85,
                  "test_accuracy": 0.8412, "samples_per_sec": 2345.6},
    )


class FakeDaemonClient:
    """In-memory daemon for Pilot and snapshot tests."""

    def __init__(self, status: dict[str, Any] | None = None, *, available: bool = True) -> None:
        self.state = copy.deepcopy(status if status is not None else base_status())
        self.available = available
        self.calls: list[tuple[Any, ...]] = []
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.host_error: RemoteError | None = None
        self.subscribers = 0
        self.closed = False

    @property
    def where(self) -> str:
        return "/tmp/fake/control.sock"

    def _check(self) -> None:
        if not self.available:
            raise Unavailable(f"no daemon answers on {self.where} (connection refused)")

    # ------------------------------------------------------------------ test controls

    def emit(self, event: str, **fields: Any) -> None:
        self.events.put_nowait({"type": "event", "event": event, **fields})

    def go_down(self) -> None:
        self.available = False
        self.events.put_nowait(_END)

    def come_back(self) -> None:
        self.available = True

    def _set_state(self, state: str) -> None:
        previous = self.state["state"]
        self.state["state"] = state
        self.emit("state", state=state, previous=previous)

    # ------------------------------------------------------------------ DaemonClient

    async def status(self) -> dict[str, Any]:
        self._check()
        self.calls.append(("status",))
        return copy.deepcopy(self.state)

    async def donate(self, on: bool) -> dict[str, Any]:
        self._check()
        self.calls.append(("donate", on))
        self.state["donating"] = on
        if not on:
            self._set_state("off")
        elif self.state["state"] == "off":
            self._set_state("standby")
        return {"type": "ok", "donating": on}

    async def host(self, dataset: str, job: dict[str, Any], model_file: str | None = None) -> dict[str, Any]:
        self._check()
        self.calls.append(("host", dataset, job) if model_file is None else ("host", dataset, job, model_file))
        if self.host_error is not None:
            raise self.host_error
        try:
            validate_job(job)
        except HyperparamError as exc:
            raise RemoteError(exc.message, field=exc.field, code=ErrorCode("bad_field")) from None
        self.state["role"] = "host"
        self.state["job"] = job
        self._set_state("registering")
        return {"type": "ok"}

    async def stop(self) -> dict[str, Any]:
        self._check()
        self.calls.append(("stop",))
        self.state["role"] = None
        self.state["group"] = None
        self._set_state("standby" if self.state["donating"] else "off")
        return {"type": "ok"}

    async def pause(self, hours: float) -> dict[str, Any]:
        self._check()
        self.calls.append(("pause", hours))
        try:
            hours = check_pause({"hours": hours})  # the control socket's own check
        except InputError as exc:
            raise RemoteError(exc.message, field=exc.field, code=exc.code) from None
        until = time.time() + hours * 3600.0
        self.state["idle"] = {**self.state["idle"], "paused_until": until}
        self.emit("status", **{k: v for k, v in self.state.items() if k != "type"})
        return {"type": "ok", "paused_until": until}

    async def resume(self) -> dict[str, Any]:
        self._check()
        self.calls.append(("resume",))
        was_paused = self.state["idle"].get("paused_until") is not None
        self.state["idle"] = {**self.state["idle"], "paused_until": None}
        self.emit("status", **{k: v for k, v in self.state.items() if k != "type"})
        return {"type": "ok", "paused_until": None, "was_paused": was_paused}

    async def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        self._check()
        self.subscribers += 1
        try:
            # like the real control socket: a subscription starts with the whole status
            yield {"type": "event", "event": "status", **{k: v for k, v in self.state.items() if k != "type"}}
            while True:
                event = await self.events.get()
                if event is _END:
                    raise Unavailable("connection to the daemon lost")
                yield event
        finally:
            self.subscribers -= 1

    async def close(self) -> None:
        self.closed = True

"""Messages between the app's workers, its screens and the app itself."""

from __future__ import annotations

from typing import Any

from textual.message import Message


class StatusLoaded(Message):
    """A worker got a status reply from the daemon."""

    def __init__(self, status: dict[str, Any]) -> None:
        super().__init__()
        self.status = status


class DaemonEvent(Message):
    """A worker received one event frame from the daemon's subscription."""

    def __init__(self, event: dict[str, Any]) -> None:
        super().__init__()
        self.event = event


class DaemonLost(Message):
    """The daemon does not answer (never started, or went away)."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class RequestDone(Message):
    """A request (donate, host, stop) succeeded."""

    def __init__(self, action: str, reply: dict[str, Any]) -> None:
        super().__init__()
        self.action = action
        self.reply = reply


class RequestFailed(Message):
    """The daemon refused a request (``field`` names the bad field, if any)."""

    def __init__(self, action: str, message: str, field: str | None = None) -> None:
        super().__init__()
        self.action = action
        self.message = message
        self.field = field


class DonateRequested(Message):
    """The user asked to switch donation on or off."""

    def __init__(self, on: bool) -> None:
        super().__init__()
        self.on = on


class HostRequested(Message):
    """The user submitted a valid Host form."""

    def __init__(self, dataset: str, job: dict[str, Any], model_file: str | None = None) -> None:
        super().__init__()
        self.dataset = dataset
        self.job = job
        self.model_file = model_file  # the host's own Keras model, or None for the preset


class PauseRequested(Message):
    """The user chose a break from donating of ``hours``."""

    def __init__(self, hours: float) -> None:
        super().__init__()
        self.hours = hours


class ResumeRequested(Message):
    """The user asked to end the pause."""


class StopRequested(Message):
    """The user confirmed stopping the session."""

"""Shown while no daemon answers: what is wrong, how to start one, and that we retry."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Center, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Label

from crowdd.client.daemon_client import START_HINT


def _detail(reason: str) -> str:
    """The reason without its own "start it with …" advice (the screen gives that once)."""
    return reason.split("; start it with", 1)[0]


class UnavailableScreen(Screen[None]):
    """The daemon is not running (or went away); the app retries on its own."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("r", "retry", "Retry now")]

    def __init__(self, where: str, reason: str, retry_interval: float) -> None:
        super().__init__()
        self.where = where
        self.reason = reason
        self.retry_interval = retry_interval

    def compose(self) -> ComposeResult:
        with Center(), Vertical(id="unavailable-box", classes="dialog"):
            yield Label("The crowdd daemon is not running", classes="dialog-title")
            yield Label(f"Nothing answers on {self.where}.", id="unavailable-where")
            yield Label(_detail(self.reason), id="unavailable-reason")
            yield Label(START_HINT, id="unavailable-hint")
            yield Label(
                f"Retrying every {self.retry_interval:g} s; this screen closes once it answers.",
                id="unavailable-retry",
            )
        yield Footer()

    def set_reason(self, reason: str) -> None:
        self.reason = reason
        # a second failure can arrive before the screen has composed; compose() shows self.reason then
        for label in self.query("#unavailable-reason").results(Label):
            label.update(_detail(reason))

    def action_retry(self) -> None:
        retry = getattr(self.app, "retry_now", None)
        if callable(retry):
            retry()

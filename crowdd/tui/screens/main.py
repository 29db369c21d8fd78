"""The main view: daemon, training, group and event panels, plus Host / Work / Pause / Stop."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Button, Footer, Label, Switch

from crowdd.tui.messages import DonateRequested, PauseRequested, ResumeRequested, StopRequested
from crowdd.tui.model import DaemonView
from crowdd.tui.screens.confirm import ConfirmStopScreen
from crowdd.tui.screens.host import HostScreen
from crowdd.tui.screens.pause import PauseScreen
from crowdd.tui.widgets import EventLog, MembersPanel, StatusPanel, TrainingPanel


class MainScreen(Screen[None]):
    """Shows a :class:`DaemonView`; user actions become messages for the app."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("d", "toggle_donation", "Donate on/off"),
        Binding("h", "host", "Host…"),
        Binding("w", "work", "Work"),
        Binding("p", "pause", "Pause/Resume"),
        Binding("s", "stop", "Stop"),
    ]

    def __init__(self, where: str, timestamp: Callable[[], str]) -> None:
        super().__init__()
        self.where = where
        self.timestamp = timestamp
        self.donating = False
        self.hosting = False
        self.paused = False
        self._ready = False
        self._pending_view: DaemonView | None = None
        self._pending_lines: list[tuple[str, str]] = []

    def compose(self) -> ComposeResult:
        yield Label(f"crowdd · {self.where}", id="topbar")
        with Horizontal(id="top"):
            yield StatusPanel(id="status")
            yield TrainingPanel(id="training")
        with Horizontal(id="middle"):
            yield MembersPanel(id="members")
            yield EventLog(self.timestamp, id="log")
        with Horizontal(id="actions"):
            yield Button("Host…", id="host", compact=True, tooltip="h: host a dataset")
            yield Button("Work", id="work", compact=True, variant="success", tooltip="w: donate as a worker")
            yield Button("Pause…", id="pause", compact=True, variant="warning",
                         tooltip="p: take a break from donating (p again resumes)")
            yield Button("Stop", id="stop", compact=True, variant="error", tooltip="s: stop the session")
        yield Footer()

    # ------------------------------------------------------------------ showing

    def on_mount(self) -> None:
        self._ready = True
        if self._pending_view is not None:
            self.show(self._pending_view)
        for level, message in self._pending_lines:
            self.log_line(level, message)
        self._pending_view, self._pending_lines = None, []

    def show(self, view: DaemonView) -> None:
        self.donating = view.donating
        self.hosting = view.role == "host"
        self.paused = view.paused
        if not self._ready:  # messages can arrive before the screen is composed
            self._pending_view = view
            return
        version = f" {view.version}" if view.version else ""
        try:
            self.query_one("#topbar", Label).update(f"crowdd{version} · {self.where}")
            self.query_one(StatusPanel).show(view)
            self.query_one(TrainingPanel).show(view)
            self.query_one(MembersPanel).show(view)
            self.query_one("#pause", Button).label = "Resume" if self.paused else "Pause…"
        except NoMatches:  # the app is shutting down and its widgets are gone
            return

    def log_line(self, level: str, message: str) -> None:
        if not self._ready:
            self._pending_lines.append((level, message))
            return
        try:
            self.query_one(EventLog).add(level, message)
        except NoMatches:  # shutting down
            return

    def set_donation(self, on: bool) -> None:
        self.donating = on
        if self._ready:
            try:
                self.query_one(StatusPanel).set_switch(on)
            except NoMatches:  # shutting down
                return

    # ------------------------------------------------------------------ controls

    def on_switch_changed(self, event: Switch.Changed) -> None:
        if event.switch.id == "donate-switch":
            event.stop()
            self.post_message(DonateRequested(event.value))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "host":
            self.action_host()
        elif event.button.id == "work":
            self.action_work()
        elif event.button.id == "pause":
            self.action_pause()
        elif event.button.id == "stop":
            self.action_stop()

    def action_toggle_donation(self) -> None:
        self.post_message(DonateRequested(not self.donating))

    def action_work(self) -> None:
        self.post_message(DonateRequested(True))

    def action_pause(self) -> None:
        """Paused: resume. Not paused: ask how long (the dialog), then pause."""
        if self.paused:
            self.post_message(ResumeRequested())
            return

        def chosen(hours: float | None) -> None:
            if hours is not None:
                self.post_message(PauseRequested(hours))

        self.app.push_screen(PauseScreen(), chosen)

    def action_host(self) -> None:
        self.app.push_screen(HostScreen())

    def action_stop(self) -> None:
        def confirmed(yes: bool | None) -> None:
            if yes:
                self.post_message(StopRequested())

        self.app.push_screen(ConfirmStopScreen(hosting=self.hosting), confirmed)

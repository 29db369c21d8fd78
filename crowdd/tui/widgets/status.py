"""The daemon panel: state (coloured), the donation switch, the idle verdict, role, dataset."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.widgets import Label, Switch

from crowdd.tui.model import STATES, DaemonView


class StatusPanel(Vertical):
    """What the daemon is doing and whether it may work."""

    BORDER_TITLE = "Daemon"

    def compose(self) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Label("State", classes="key")
            yield Label("connecting…", id="state", classes="state-unknown")
        with Horizontal(classes="row"):
            yield Label("Donate", classes="key")
            yield Switch(value=False, id="donate-switch", tooltip="d: donate this machine's idle time")
            yield Label("Donation OFF", id="donation")
        with Horizontal(classes="row"):
            yield Label("Idle", classes="key")
            yield Label("unknown", id="idle")
        with Horizontal(classes="row"):
            yield Label("Role", classes="key")
            yield Label("none", id="role")
        with Horizontal(classes="row"):
            yield Label("Data", classes="key")
            yield Label("none", id="dataset")
        with Horizontal(classes="row", id="note-row"):
            yield Label("Note", classes="key")
            yield Label("", id="note")

    def show(self, view: DaemonView) -> None:
        state = self.query_one("#state", Label)
        state.update(view.state if view.connected else "connecting…")
        for name in (*STATES, "unknown"):
            state.remove_class(f"state-{name}")
        state.add_class(f"state-{view.state}" if view.connected and view.state in STATES else "state-unknown")

        self.set_switch(view.donating)

        idle = self.query_one("#idle", Label)
        idle.update(Content(view.idle_text))
        idle.set_class(view.idle_allowed is True, "idle-yes")
        idle.set_class(view.idle_allowed is False, "idle-no")
        self.query_one("#role", Label).update(Content(view.role_text))
        self.query_one("#dataset", Label).update(Content(view.dataset_text))  # the host names it: never markup

        note = self.query_one("#note", Label)
        row = self.query_one("#note-row")
        if view.error:
            note.update(Content(f"error: {view.error}"))
            note.add_class("error")
            row.display = True
        else:
            note.remove_class("error")
            note.update("")
            row.display = False

    def set_switch(self, on: bool) -> None:
        """Show ``on`` without asking the daemon for anything (no Changed message)."""
        switch = self.query_one("#donate-switch", Switch)
        with switch.prevent(Switch.Changed):
            switch.value = on
        label = self.query_one("#donation", Label)
        label.update("Donation ON" if on else "Donation OFF")
        label.set_class(on, "on")

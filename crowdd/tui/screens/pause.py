"""Pause dialog: how long to take a break from donating; answers the hours, or None (cancel)."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label

from crowdd.errors import InputError
from crowdd.protocol.control import parse_duration

DEFAULT_PAUSE = "1h"
#: One key per common break: the dialog's quick choices.
CHOICES = (("30m", "30 min"), ("1h", "1 h"), ("2h", "2 h"), ("8h", "8 h"), ("1d", "1 day"))


class PauseScreen(ModalScreen[float | None]):
    """"Pause donating for how long?" — a duration (``2h``, ``30m``, ``1.5h``, ``1d``), checked
    here with the CLI's own rules; Enter or Pause answers its hours, Escape cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    HELP = ("This machine does no work for the crowd until then: a running session is suspended or "
            "left (the idle setting on_busy says which). Resume (p) ends the pause early.")

    def __init__(self, default: str = DEFAULT_PAUSE) -> None:
        super().__init__()
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(id="pause-dialog", classes="dialog"):
            yield Label("Pause donating for how long?", classes="dialog-title")
            yield Label(self.HELP)
            with Horizontal(id="pause-choices"):
                for value, label in CHOICES:
                    yield Button(label, id=f"pause-{value}", compact=True)
            yield Input(value=self.default, placeholder="2h, 30m, 1.5h, 1d", id="pause-duration")
            yield Label("", id="pause-error", classes="error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Pause", id="pause-ok", variant="warning", compact=True)
                yield Button("Cancel", id="pause-cancel", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#pause-duration", Input).focus()

    def _submit(self, text: str) -> None:
        try:
            hours = parse_duration(text)
        except InputError as exc:
            self.query_one("#pause-error", Label).update(exc.message)
            return
        self.dismiss(hours)

    def on_input_changed(self, event: Input.Changed) -> None:
        self.query_one("#pause-error", Label).update("")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._submit(event.value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        bid = event.button.id or ""
        if bid == "pause-cancel":
            self.dismiss(None)
        elif bid == "pause-ok":
            self._submit(self.query_one("#pause-duration", Input).value)
        elif bid.startswith("pause-"):
            self._submit(bid.removeprefix("pause-"))

    def action_cancel(self) -> None:
        self.dismiss(None)

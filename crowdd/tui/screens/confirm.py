"""Stop confirmation: a modal that answers True (stop) or False (keep going)."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Label


class ConfirmStopScreen(ModalScreen[bool]):
    """"Stop the current session?" — y / n, Enter on a button, Escape cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Stop"),
        Binding("n,escape", "answer(False)", "Cancel"),
    ]

    WORKER = "The group is left and training ends on this machine. Donation stays as it is."
    HOST = ("This ends the whole group's training, on every member. The latest checkpoint is kept "
            "and the model trained so far is written.")

    def __init__(self, *, hosting: bool = False) -> None:
        super().__init__()
        self.hosting = hosting

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-dialog", classes="dialog"):
            yield Label("Stop the current session?", classes="dialog-title")
            yield Label(self.HOST if self.hosting else self.WORKER)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Stop", id="confirm-stop", variant="error", compact=True)
                yield Button("Cancel", id="confirm-cancel", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#confirm-cancel", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "confirm-stop")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

"""The Host form: a dataset and the job's hyperparameters, each checked as you type.

Every field is checked with the matchmaker's own rules (:mod:`crowdd.tui.form`, which
calls :mod:`crowdd.hyperparams`) and a message appears beside it. A valid form posts
:class:`~crowdd.tui.messages.HostRequested`; the app sends it and either dismisses this
screen or calls :meth:`HostScreen.show_error` with the daemon's answer.
"""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.validation import ValidationResult, Validator
from textual.widgets import Button, Footer, Input, Label, Select

from crowdd.tui.form import FIELDS, FormError, build_request, field_error, model_file_path
from crowdd.tui.messages import HostRequested

DATASET_HINT = ".npz, .csv, an IDX directory, or a folder of class folders of images"


class FieldCheck(Validator):
    """Validates one form field with :func:`crowdd.tui.form.field_error`."""

    def __init__(self, field: str) -> None:
        super().__init__()
        self.field = field

    def validate(self, value: str) -> ValidationResult:
        message = field_error(self.field, value)
        return self.success() if message is None else self.failure(message)


class HostScreen(ModalScreen[None]):
    """Host a dataset: pick it, set the hyperparameters, press Host."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "submit", "Host")]

    def __init__(self, dataset: str = "") -> None:
        super().__init__()
        self.initial_dataset = dataset

    def compose(self) -> ComposeResult:
        with Vertical(id="host-dialog", classes="dialog"):
            yield Label("Host a dataset", classes="dialog-title")
            with VerticalScroll(id="host-fields"):
                with Horizontal(classes="field-row"):
                    yield Label("Dataset", classes="field-label")
                    yield Input(
                        self.initial_dataset,
                        placeholder="path/to/data.npz",
                        id="field-dataset",
                        validators=[FieldCheck("dataset")],
                        compact=True,
                    )
                yield Label(DATASET_HINT, id="msg-dataset", classes="field-msg dataset-msg")
                with Horizontal(classes="field-row"):
                    yield Label("Model file", classes="field-label")
                    yield Input(
                        "",
                        placeholder="optional .keras",
                        id="field-model_file",
                        validators=[FieldCheck("model_file")],
                        compact=True,
                    )
                yield Label("", id="msg-model_file", classes="field-msg")
                for spec in FIELDS:
                    with Horizontal(classes="field-row"):
                        yield Label(spec.label, classes="field-label")
                        if spec.kind == "choice":
                            yield Select(
                                [(c, c) for c in spec.choices],
                                value=spec.default,
                                allow_blank=False,
                                id=f"field-{spec.name}",
                                compact=True,
                            )
                        else:
                            yield Input(
                                spec.default,
                                id=f"field-{spec.name}",
                                validators=[FieldCheck(spec.name)],
                                compact=True,
                            )
                        yield Label("", id=f"msg-{spec.name}", classes="field-msg")
            yield Label("", id="form-status")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Host", id="host-submit", variant="primary", compact=True)
                yield Button("Cancel", id="host-cancel", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#field-dataset", Input).focus()

    # ------------------------------------------------------------------ checking

    def _set_message(self, field: str, message: str | None) -> bool:
        """Show ``message`` beside ``field``; False when the form has no such field."""
        labels = self.query(f"#msg-{field}")
        if not labels:
            return False
        label = labels.first(Label)
        if message:
            label.update(message)
            label.add_class("error")
        else:
            label.update(DATASET_HINT if field == "dataset" else "")
            label.remove_class("error")
        return True

    def on_input_changed(self, event: Input.Changed) -> None:
        field = (event.input.id or "").removeprefix("field-")
        result = event.validation_result
        self._set_message(field, None if result is None or result.is_valid else result.failure_descriptions[0])
        self.query_one("#form-status", Label).update("")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_submit()

    def _values(self) -> dict[str, str]:
        values = {"dataset": self.query_one("#field-dataset", Input).value,
                  "model_file": self.query_one("#field-model_file", Input).value}
        for spec in FIELDS:
            widget = self.query_one(f"#field-{spec.name}")
            if isinstance(widget, Select):
                values[spec.name] = str(widget.value)
            elif isinstance(widget, Input):
                values[spec.name] = widget.value
        return values

    def show_error(self, field: str | None, message: str) -> None:
        """Show an error (from the form's rules or from the daemon) beside its field."""
        self.query_one("#host-submit", Button).disabled = False
        status = self.query_one("#form-status", Label)
        if field and self._set_message(field, message):
            status.update(f"Fix {field.replace('_', ' ')}: {message}")
            widgets = self.query(f"#field-{field}")
            if widgets:
                widgets.first().focus()
        else:
            status.update(f"{field + ': ' if field else ''}{message}")
        status.add_class("error")

    def action_submit(self) -> None:
        values = self._values()
        for name, text in values.items():
            if self.query(f"#field-{name}").first().__class__ is Input:
                self._set_message(name, field_error(name, text))
        try:
            dataset, job = build_request(values)
        except FormError as exc:
            self.show_error(exc.field, exc.message)
            return
        status = self.query_one("#form-status", Label)
        status.remove_class("error")
        status.update("Asking the daemon to host…")
        self.query_one("#host-submit", Button).disabled = True
        self.post_message(HostRequested(dataset, job, model_file_path(values.get("model_file", ""))))

    # ------------------------------------------------------------------ buttons

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "host-submit":
            self.action_submit()
        else:
            self.action_cancel()

    def action_cancel(self) -> None:
        self.dismiss(None)

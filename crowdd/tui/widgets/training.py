"""The training panel: epoch, step, samples/s, a progress bar, and loss / accuracy plots."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Sparkline

from crowdd.tui.model import DaemonView


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _int(v: Any) -> int | None:
    n = _num(v)
    return int(n) if n is not None else None


class TrainingPanel(Vertical):
    """Training progress of the current session, plotted live."""

    BORDER_TITLE = "Training"

    def compose(self) -> ComposeResult:
        yield Label("not training", id="progress-text")
        with Horizontal(id="bar-row"):
            yield ProgressBar(total=1, show_eta=False, id="epoch-bar")
            yield Label("", id="rate")
        with Horizontal(classes="plot"):
            yield Label("loss\n–", id="loss-text", classes="plot-label")
            yield Sparkline([], id="loss-plot")
        with Horizontal(classes="plot"):
            yield Label("test acc\n–", id="acc-text", classes="plot-label")
            yield Sparkline([], id="acc-plot")

    def show(self, view: DaemonView) -> None:
        t = view.training
        epoch, epochs, step = _int(t.get("epoch")), _int(t.get("epochs")), _int(t.get("step"))
        rate = _num(t.get("samples_per_sec"))
        parts = []
        if epoch is not None:
            parts.append(f"epoch {epoch}/{epochs}" if epochs else f"epoch {epoch}")
        if step is not None:
            parts.append(f"step {step}")
        self.query_one("#rate", Label).update(f" {rate:,.0f} samples/s" if rate is not None else "")
        if view.result and _num(view.result.get("test_accuracy")) is not None:
            parts.insert(0, f"done, test acc {_num(view.result.get('test_accuracy')):.4f}")
        self.query_one("#progress-text", Label).update("  ".join(parts) if parts else "not training")

        bar = self.query_one("#epoch-bar", ProgressBar)
        total = max(epochs or 1, 1)
        finished = view.state == "finished" or view.result is not None
        done = total if finished else min(max((epoch or 1) - 1, 0), total) if epoch is not None else 0
        bar.update(total=total, progress=done)

        loss = list(view.loss)
        acc = list(view.test_accuracy)
        self.query_one("#loss-plot", Sparkline).data = loss
        self.query_one("#acc-plot", Sparkline).data = acc
        self.query_one("#loss-text", Label).update(f"loss\n{loss[-1]:.4f}" if loss else "loss\n–")
        self.query_one("#acc-text", Label).update(f"test acc\n{acc[-1]:.4f}" if acc else "test acc\n–")

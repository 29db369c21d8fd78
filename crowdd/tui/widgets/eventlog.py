"""The log pane: recent daemon events, newest at the bottom."""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual.widgets import RichLog

_STYLES = {"error": "bold red", "warning": "yellow", "info": "", "debug": "dim"}


class EventLog(RichLog):
    """A :class:`RichLog` that stamps each line with ``timestamp()`` (injected, for tests)."""

    BORDER_TITLE = "Events"

    def __init__(self, timestamp: Callable[[], str], **kwargs: object) -> None:
        super().__init__(max_lines=500, min_width=20, wrap=True, markup=False, highlight=False, **kwargs)  # type: ignore[arg-type]
        self._timestamp = timestamp

    def add(self, level: str, message: str) -> None:
        line = Text(f"{self._timestamp()} ", style="dim")
        line.append(message, style=_STYLES.get(level.lower(), ""))
        self.write(line)

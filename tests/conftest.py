"""Suite-wide guards."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from crowdd.node.states import InvalidTransition


class _InvalidTransitions(logging.Handler):
    """Collects every logged InvalidTransition: a daemon bug the daemon survives (its cycle
    fails and it retries), so it would otherwise pass unnoticed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, InvalidTransition):
            self.seen.append(f"{record.name}: {exc}")


@pytest.fixture(autouse=True)
def no_invalid_state_transitions() -> Iterator[None]:
    """Fail any test during which an in-process daemon tried an invalid state transition."""
    handler = _InvalidTransitions()
    log = logging.getLogger("crowdd")
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
    if handler.seen:
        pytest.fail(f"invalid state transition(s): {handler.seen}")

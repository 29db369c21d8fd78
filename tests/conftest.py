"""Suite-wide guards."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator

import pytest

from crowdd.node.states import InvalidTransition

# A shell that starts the suite in the background (`scripts/test &`) starts it with SIGINT
# ignored, and an ignored signal stays ignored through exec in every child: the tests that
# press Ctrl-C on a demo or on `crowdd logs -f` would then wait on a process that cannot hear
# it. A handler here is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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

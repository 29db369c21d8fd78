"""The daemon's donation states and the transitions between them.

off → standby → registering → waiting → replicating → training → finished → standby, and
back to off/standby from anywhere (stop, errors, donation off, the idle policy saying no).
"""

from __future__ import annotations

import enum
from collections.abc import Callable


class State(str, enum.Enum):
    OFF = "off"
    STANDBY = "standby"
    REGISTERING = "registering"
    WAITING = "waiting"
    REPLICATING = "replicating"
    TRAINING = "training"
    FINISHED = "finished"


S = State
#: Forward edges. Besides these, every state may fall back to OFF or STANDBY (stop, an
#: error, donation switched off, the idle policy saying no).
TRANSITIONS: dict[State, frozenset[State]] = {
    S.OFF: frozenset({S.STANDBY, S.REGISTERING}),
    S.STANDBY: frozenset({S.REGISTERING}),
    S.REGISTERING: frozenset({S.WAITING}),
    S.WAITING: frozenset({S.REGISTERING, S.REPLICATING}),
    S.REPLICATING: frozenset({S.TRAINING}),
    S.TRAINING: frozenset({S.FINISHED}),
    S.FINISHED: frozenset(),
}
FALLBACK = frozenset({S.OFF, S.STANDBY})


class InvalidTransition(RuntimeError):
    """A transition the state machine does not allow (a daemon bug, never user input)."""


def allowed(a: State, b: State) -> bool:
    return b in TRANSITIONS[a] or b in FALLBACK


class StateMachine:
    def __init__(self, on_change: Callable[[State, State], None], initial: State = S.OFF) -> None:
        self.state = initial
        self._on_change = on_change

    def to(self, new: State) -> bool:
        """Move to ``new``; False if already there. Raises :class:`InvalidTransition`."""
        old = self.state
        if new == old:
            return False
        if not allowed(old, new):
            raise InvalidTransition(f"{old.value} -> {new.value}")
        self.state = new
        self._on_change(old, new)
        return True


__all__ = ["FALLBACK", "TRANSITIONS", "InvalidTransition", "State", "StateMachine", "allowed"]

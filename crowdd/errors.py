"""The one error catalog: every error a user or a peer may see is a :class:`CrowddError`.

A :class:`CrowddError` carries the public wire code (:class:`ErrorCode`), a human message and,
where one input is at fault, the ``field`` that names it (a hyperparameter, a config key, a
dotted path in a frame or spec, a CLI flag). Each kind of error below is a subclass that fixes
its default code, so callers catch the family they handle and servers turn any of them into an
``error`` frame with :meth:`CrowddError.to_frame`. Anything that is not a :class:`CrowddError`
is an internal error: servers log it and answer only ``internal`` (internals never reach the
wire).
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(str, enum.Enum):
    """Public error codes. Internal errors map onto these; nothing else reaches the wire."""

    BAD_FRAME = "bad_frame"
    TOO_LARGE = "too_large"
    UNKNOWN_TYPE = "unknown_type"
    BAD_FIELD = "bad_field"
    VERSION = "version"
    UNAUTHORIZED = "unauthorized"
    BUSY = "busy"
    UNREACHABLE = "unreachable"
    INTERNAL = "internal"

    def __str__(self) -> str:  # "bad_field", not "ErrorCode.BAD_FIELD", in messages and f-strings
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def parse(cls, value: Any) -> ErrorCode:
        """A code as received from a peer; an unknown one is ``internal``."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL


class CrowddError(Exception):
    """An error for a user or a peer: public ``code``, human ``message``, optional ``field``."""

    default_code = ErrorCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None, code: ErrorCode | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code if code is not None else self.default_code
        self.message = message
        self.field = field

    def to_frame(self) -> dict[str, Any]:
        """The ``error`` frame that tells a peer about this error."""
        frame: dict[str, Any] = {"type": "error", "code": self.code.value, "message": self.message}
        if self.field is not None:
            frame["field"] = self.field
        return frame


class InputError(CrowddError):
    """A value the user or a peer gave that cannot be used (``bad_field``)."""

    default_code = ErrorCode.BAD_FIELD


class RemoteError(CrowddError):
    """A peer answered with an ``error`` frame: its code, message and field, as it sent them."""

    @classmethod
    def from_frame(cls, frame: dict[str, Any]) -> RemoteError:
        field = frame.get("field")
        return cls(
            str(frame.get("message", "")) or "the peer refused the request",
            field=field if isinstance(field, str) else None,
            code=ErrorCode.parse(frame.get("code")),
        )


class Unavailable(CrowddError):
    """Nothing answers where a peer (the daemon, the matchmaker) was expected."""


class SessionFailed(CrowddError):
    """A session that could not go on; the message is for the user (status ``error``)."""


__all__ = ["CrowddError", "ErrorCode", "InputError", "RemoteError", "SessionFailed", "Unavailable"]

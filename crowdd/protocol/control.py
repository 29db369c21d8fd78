"""The control socket's messages: the requests the CLI, the TUI and the Windows service send,
what the daemon answers, the status schema and the event kinds.

Clients build requests with the ``make_*`` functions; the control server checks each request
once with the ``check_*`` functions (the trust boundary for a local user's input) and hands the
daemon typed values. :class:`Status` is the one status schema: the daemon produces it, ``crowdd
status`` and the TUI read it.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from crowdd import wire
from crowdd.errors import ErrorCode, InputError
from crowdd.data.handoff import IDX_NAME, MAX_FILES, Upload, check_name
from crowdd.hyperparams import HyperparamError, Job, validate_job

REQUEST_TYPES = ("status", "subscribe", "donate", "host", "stop", "reload", "pause", "resume")
#: The longest pause a user may ask for (a year; :data:`crowdd.idle.policy.MAX_PAUSE_HOURS`).
MAX_PAUSE_HOURS = 24 * 365
#: Kinds of ``{"type": "event", "event": KIND, ...}`` frames a subscriber receives.
EVENT_KINDS = ("status", "state", "log", "members", "replication", "progress", "eval", "result")


# --------------------------------------------------------------------------- requests


def make_status() -> dict[str, Any]:
    return {"type": "status"}


def make_subscribe() -> dict[str, Any]:
    return {"type": "subscribe"}


def make_donate(on: bool) -> dict[str, Any]:
    return {"type": "donate", "on": on}


def make_host(dataset: str, job: Mapping[str, Any], test_fraction: float | None = None,
              model_file: str | None = None, label: str | None = None,
              files: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``files``: the dataset's files the client hands over (:mod:`crowdd.data.handoff`); then
    ``dataset`` only names where they came from."""
    frame: dict[str, Any] = {"type": "host", "dataset": dataset, "job": dict(job)}
    if files is not None:
        frame["files"] = files
    if test_fraction is not None:
        frame["test_fraction"] = test_fraction
    if model_file is not None:
        frame["model_file"] = model_file
    if label is not None:
        frame["label"] = label
    return frame


def make_stop() -> dict[str, Any]:
    return {"type": "stop"}


def make_reload() -> dict[str, Any]:
    return {"type": "reload"}


def make_pause(hours: float) -> dict[str, Any]:
    return {"type": "pause", "hours": hours}


def make_resume() -> dict[str, Any]:
    return {"type": "resume"}


def check_donate(frame: Mapping[str, Any]) -> bool:
    return bool(wire.require(frame, "on", bool))


def check_pause(frame: Mapping[str, Any]) -> float:
    """A ``pause`` request's hours: a finite number, 0 < hours <= a year."""
    hours = frame.get("hours")
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not math.isfinite(hours):
        raise InputError(f"field 'hours' must be a number of hours, got {hours!r}", field="hours")
    if not 0 < hours <= MAX_PAUSE_HOURS:
        raise InputError(f"hours must be more than 0 and at most {MAX_PAUSE_HOURS} (a year), got {hours:g}",
                         field="hours")
    return float(hours)


_DURATION = re.compile(r"(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]*)")
_UNITS = {
    "": 1.0, "h": 1.0, "hr": 1.0, "hrs": 1.0, "hour": 1.0, "hours": 1.0,
    "m": 1 / 60, "min": 1 / 60, "mins": 1 / 60, "minute": 1 / 60, "minutes": 1 / 60,
    "d": 24.0, "day": 24.0, "days": 24.0,
}


def parse_duration(text: str, field: str = "duration") -> float:
    """A pause's length as the user writes it → hours: ``2h``, ``30m``, ``1.5h``, ``90m``, ``1d``,
    ``1h30m``; a bare number is hours. Raises :class:`InputError` naming ``field``."""
    raw = text.strip().lower() if isinstance(text, str) else ""
    hint = "expected a duration like 2h, 30m, 1.5h, 90m or 1d (a bare number is hours)"
    pos, hours, parts = 0, 0.0, 0
    compact = raw.replace(" ", "")
    while pos < len(compact):
        m = _DURATION.match(compact, pos)
        if m is None or m.group("unit") not in _UNITS or (parts and m.group("unit") == ""):
            raise InputError(f"{hint}, got {text!r}", field=field)
        hours += float(m.group("num")) * _UNITS[m.group("unit")]
        pos, parts = m.end(), parts + 1
    if parts == 0:
        raise InputError(f"{hint}, got {text!r}", field=field)
    if not math.isfinite(hours) or hours <= 0:
        raise InputError(f"a pause must last more than 0 minutes, got {text!r}", field=field)
    if hours > MAX_PAUSE_HOURS:
        raise InputError(f"a pause lasts at most a year ({MAX_PAUSE_HOURS} h), got {text!r}", field=field)
    return hours


def format_pause(until: float, now: float | None = None) -> str:
    """``paused until 14:30 (1 h 59 min left)`` (a weekday or date when it is not today)."""
    now = time.time() if now is None else now
    at, today = time.localtime(until), time.localtime(now)
    if (at.tm_year, at.tm_yday) == (today.tm_year, today.tm_yday):
        when = time.strftime("%H:%M", at)
    elif until - now < 6 * 86400:
        when = time.strftime("%a %H:%M", at)
    else:
        when = time.strftime("%Y-%m-%d %H:%M", at)
    return f"paused until {when} ({format_left(until - now)} left)"


def format_left(seconds: float) -> str:
    """``1 h 59 min``, ``2 d 3 h``, ``12 min``, ``under a minute``."""
    minutes = int(max(0.0, seconds) // 60)
    if minutes < 1:
        return "under a minute"
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {mins} min" if mins else f"{hours} h"
    return f"{mins} min"


@dataclass(frozen=True)
class HostRequest:
    """Host this dataset (an absolute path that exists) with this job. ``files``: the
    (name, size) of each file the client hands over instead (:mod:`crowdd.data.handoff`); the
    daemon then gets them as ``upload``, and ``dataset`` only says where they came from."""

    dataset: Path
    job: Job
    test_fraction: float | None = None
    model_file: Path | None = None  # the host's own Keras model (job.model "file")
    label: str | None = None  # a CSV's label column, by its header name
    image_size: tuple[int, int] | None = None  # image folders: resize every image to H x W
    color: str | None = None  # image folders: "rgb" or "grayscale"
    task: str = "classification"  # or "regression": the label column is a number to predict
    files: tuple[tuple[str, int], ...] = ()
    upload: Upload | None = field(default=None, compare=False)
    #: where the client had the dataset, when ``dataset`` is the daemon's copy of it
    origin: Path | None = None

    @property
    def shown(self) -> Path:
        """The dataset as its owner knows it (for messages)."""
        return self.origin or self.dataset

    def as_shown(self, text: str) -> str:
        """``text`` with the daemon's copy's path replaced by the owner's."""
        return text.replace(str(self.dataset), str(self.origin)) if self.origin is not None else text


def check_host(frame: Mapping[str, Any]) -> HostRequest:
    """Check a ``host`` request: the job by :func:`validate_job`, the dataset path, the test
    fraction; raise :class:`InputError` naming the field."""
    dataset = frame.get("dataset")
    if not isinstance(dataset, str):
        raise InputError("field 'dataset' must be a string", field="dataset")
    job = frame.get("job", {})
    if not isinstance(job, dict):
        raise InputError("field 'job' must be an object", field="job")
    try:
        parsed = validate_job(job)
    except HyperparamError as exc:
        raise InputError(exc.message, field=exc.field) from None
    path = Path(dataset)
    if not path.is_absolute():
        raise InputError(f"dataset path must be absolute, got {dataset!r}", field="dataset")
    files = _check_files(frame.get("files"))
    if not files:
        try:
            os.stat(path)
        except FileNotFoundError:
            raise InputError(f"{dataset}: no such file or directory", field="dataset") from None
        except OSError as exc:  # EACCES: the daemon may not look there (hand it the files instead)
            raise InputError(f"{dataset}: the daemon cannot see it ({exc.strerror}); `crowdd host` hands the files "
                             "over with your permissions", field="dataset") from None
    tf = frame.get("test_fraction")
    if tf is not None:
        if isinstance(tf, bool) or not isinstance(tf, (int, float)):
            raise InputError("field 'test_fraction' must be a number", field="test_fraction")
        if not 0 < tf < 1:
            raise InputError("test_fraction must be between 0 and 1", field="test_fraction")
    model_file = _model_file(frame.get("model_file"))
    if model_file is not None:
        parsed = dataclasses.replace(parsed, model="file")
    elif parsed.model == "file":
        raise InputError("model 'file' needs a model_file (crowdd host --model-file PATH)", field="model_file")
    label = frame.get("label")
    if label is not None and (not isinstance(label, str) or not label.strip() or len(label) > 256):
        raise InputError("field 'label' must be a column name (1..256 characters)", field="label")
    size = frame.get("image_size")
    if size is not None and (not isinstance(size, list) or len(size) != 2
                             or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in size)):
        raise InputError("field 'image_size' must be [height, width] in pixels, 1..4096 each", field="image_size")
    color = frame.get("color")
    if color is not None and color not in ("rgb", "grayscale"):
        raise InputError("field 'color' must be rgb or grayscale", field="color")
    task = frame.get("task", "classification")
    if task not in ("classification", "regression"):
        raise InputError("field 'task' must be classification or regression", field="task")
    return HostRequest(path, parsed, float(tf) if tf is not None else None, model_file, label,
                       (size[0], size[1]) if size is not None else None, color, task, files)


def _model_file(value: Any) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError("field 'model_file' must be a string", field="model_file")
    path = Path(value)
    if not path.is_absolute():
        raise InputError(f"model file path must be absolute, got {value!r}", field="model_file")
    if not path.is_file():
        raise InputError(f"{value}: no such file", field="model_file")
    return path


def _check_files(files: Any) -> tuple[tuple[str, int], ...]:
    if files is None:
        return ()
    if not isinstance(files, list) or not 1 <= len(files) <= MAX_FILES:
        raise InputError(f"field 'files' must be a list of 1 to {MAX_FILES} files", field="files")
    out: list[tuple[str, int]] = []
    for i, f in enumerate(files):
        if not isinstance(f, dict):
            raise InputError("each file must be an object with name and size", field=f"files[{i}]")
        size = f.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InputError(f"size must be an integer >= 0, got {size!r}", field=f"files[{i}].size")
        out.append((check_name(f.get("name"), f"files[{i}].name"), size))
    if len({name for name, _ in out}) != len(out):
        raise InputError("two handed files have the same name", field="files")
    if len(out) > 1 and not all(IDX_NAME.fullmatch(name) for name, _ in out):
        raise InputError("several files must be a directory's IDX files", field="files")
    return tuple(out)


def ok(**fields: Any) -> dict[str, Any]:
    return {"type": "ok", **fields}


# --------------------------------------------------------------------------- status schema


class IdleStatus(TypedDict):
    allowed: bool
    rule: str | None
    reason: str
    #: the end of the user's pause (epoch seconds), or None when not paused
    paused_until: float | None


class TensorflowStatus(TypedDict):
    """Whether this node's TF servers run confined to a private network (``confined``) and in
    the Landlock sandbox (``sandboxed``, ``landlock_abi``: 0 without Landlock); if not, why
    (``reason``) and whether the node trains anyway (``allowed``: ``[security]
    allow_exposed_tensorflow``, ``allow_unsandboxed``). ``caps``: how a job's memory and task
    caps are held: ``cgroup v1`` / ``cgroup v2`` (the kernel's), or ``poll (why)``.
    ``private_view``: a job sees its own ``/proc``, host name and users, not the machine's."""

    confined: bool
    sandboxed: bool
    landlock_abi: int
    allowed: bool
    reason: str
    caps: NotRequired[str]
    private_view: NotRequired[bool]


class QueueStatus(TypedDict):
    position: int
    hosts: int
    workers: int


class GroupStatus(TypedDict):
    id: str
    index: int
    members: list[dict[str, Any]]


class ResultStatus(TypedDict, total=False):
    test_accuracy: float | None  # classification; always present (None for regression)
    model_path: str | None  # always present
    test_mae: float | None  # regression only
    test_mse: float | None  # regression only
    model_sha256: str  # the host's model file as its job left it (hex); absent on a worker


class Status(TypedDict):
    """What ``status`` answers (and the first event of a subscription)."""

    version: str
    name: str
    state: str
    donating: bool
    role: str | None
    idle: IdleStatus
    tensorflow: TensorflowStatus
    queue: QueueStatus | None
    group: GroupStatus | None
    job: dict[str, Any] | None
    settings: dict[str, Any] | None
    dataset: dict[str, Any] | None
    training: dict[str, Any] | None
    result: ResultStatus | None
    error: str | None


STATUS_KEYS = tuple(Status.__annotations__)


def check_status(frame: Mapping[str, Any]) -> Status:
    """A ``status`` reply as a client receives it: every key of the schema must be there."""
    missing = [k for k in STATUS_KEYS if k not in frame]
    if missing:
        raise wire.WireError(ErrorCode.BAD_FRAME, f"status reply lacks {', '.join(missing)}")
    return Status(**{k: frame[k] for k in STATUS_KEYS})  # type: ignore[typeddict-item]


__all__ = [
    "EVENT_KINDS", "REQUEST_TYPES", "STATUS_KEYS", "GroupStatus", "HostRequest", "IdleStatus", "QueueStatus",
    "MAX_PAUSE_HOURS", "ResultStatus", "Status", "TensorflowStatus", "check_donate", "check_host", "check_pause",
    "check_status", "format_left", "format_pause", "make_donate", "make_host", "make_pause", "make_reload",
    "make_resume", "make_status", "make_stop", "make_subscribe", "ok", "parse_duration",
]

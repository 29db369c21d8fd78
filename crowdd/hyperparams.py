"""The host's job: hyperparameters, checked with one set of rules everywhere.

The matchmaker validates a host's job at the door, the CLI and the TUI check the same rules
as the user types, and the job process checks them again before TensorFlow starts. All of
them call :func:`validate_job`, which raises :class:`HyperparamError` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from crowdd.errors import InputError
from crowdd.route import DEFAULT_CHUNK, DEFAULT_ROUTE, MAX_CHUNK

#: "file": the host's own Keras model file (``crowdd host --model-file``); the others are presets.
PRESETS = ("mlp", "cnn")
MODELS = (*PRESETS, "file")
OPTIMIZERS = ("sgd", "adam")
SHARDINGS = ("overlap", "disjoint", "full")
LOSSES = ("sparse_categorical_crossentropy",)
MAX_WORKERS = 1024
MAX_EPOCHS = 10_000
MAX_BATCH = 1 << 20
MAX_LAYER = 1 << 16
MAX_LAYERS = 16


class HyperparamError(InputError):
    """An impossible or unknown hyperparameter; ``field`` names it."""

    field: str

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field=field)


@dataclass(frozen=True)
class Job:
    """Hyperparameters of one training job (the paper's sliders, plus what it hardcoded)."""

    model: str = "mlp"
    hidden: tuple[int, ...] = (100,)
    optimizer: str = "sgd"
    learning_rate: float = 0.5
    batch_size: int = 100
    epochs: int = 5
    workers: int = 2
    min_workers: int = 1
    wait: float = 60.0
    sharding: str = "full"
    loss: str = "sparse_categorical_crossentropy"
    #: the host also evaluates every this many seconds of training (0: once per epoch only)
    eval_every_secs: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


_FIELDS = {f for f in Job.__dataclass_fields__}


def _number(d: Mapping[str, Any], name: str, default: Any) -> float:
    v = d.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise HyperparamError(name, f"must be a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise HyperparamError(name, "must be finite")
    return float(v)


def _int(d: Mapping[str, Any], name: str, default: Any, lo: int, hi: int) -> int:
    v = d.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise HyperparamError(name, f"must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise HyperparamError(name, f"must be between {lo} and {hi}, got {v}")
    return v


def _choice(d: Mapping[str, Any], name: str, default: str, choices: tuple[str, ...]) -> str:
    v = d.get(name, default)
    if v not in choices:
        raise HyperparamError(name, f"must be one of {', '.join(choices)}, got {v!r}")
    return str(v)


def parse_hidden(value: Any) -> tuple[int, ...]:
    """Hidden layer sizes from a list of ints or a string like ``"128,64"``."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace("-", ",").split(",") if p.strip()]
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise HyperparamError("hidden", f"must be layer sizes like 128,64, got {value!r}") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise HyperparamError("hidden", "must be a non-empty list of layer sizes")
    if len(value) > MAX_LAYERS:
        raise HyperparamError("hidden", f"at most {MAX_LAYERS} layers")
    out = []
    for size in value:
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_LAYER:
            raise HyperparamError("hidden", f"each layer size must be an integer 1..{MAX_LAYER}, got {size!r}")
        out.append(size)
    return tuple(out)


def validate_job(d: Mapping[str, Any]) -> Job:
    """Check a job mapping (from the wire, TOML, CLI or a form) and return a :class:`Job`."""
    if not isinstance(d, Mapping):
        raise HyperparamError("job", "must be an object")
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        raise HyperparamError(unknown[0], "unknown hyperparameter")
    base = Job()
    lr = _number(d, "learning_rate", base.learning_rate)
    if not 0 < lr <= 100:
        raise HyperparamError("learning_rate", f"must be > 0 and <= 100, got {lr}")
    wait = _number(d, "wait", base.wait)
    if not 0 <= wait <= 86_400:
        raise HyperparamError("wait", f"must be between 0 and 86400 seconds, got {wait}")
    every = _number(d, "eval_every_secs", base.eval_every_secs)
    if not 0 <= every <= 86_400:
        raise HyperparamError("eval_every_secs", f"must be between 0 and 86400 seconds, got {every}")
    workers = _int(d, "workers", base.workers, 0, MAX_WORKERS)
    min_workers = _int(d, "min_workers", min(base.min_workers, workers), 0, MAX_WORKERS)
    if min_workers > workers:
        raise HyperparamError("min_workers", f"must be <= workers ({workers}), got {min_workers}")
    return Job(
        model=_choice(d, "model", base.model, MODELS),
        hidden=parse_hidden(d.get("hidden", list(base.hidden))),
        optimizer=_choice(d, "optimizer", base.optimizer, OPTIMIZERS),
        learning_rate=lr,
        batch_size=_int(d, "batch_size", base.batch_size, 1, MAX_BATCH),
        epochs=_int(d, "epochs", base.epochs, 1, MAX_EPOCHS),
        workers=workers,
        min_workers=min_workers,
        wait=wait,
        sharding=_choice(d, "sharding", base.sharding, SHARDINGS),
        loss=_choice(d, "loss", base.loss, LOSSES),
        eval_every_secs=every,
    )


ROUTES = ("binomial", "chain", "star")
#: how the coordinator merges a worker's K-step change: ``average`` adds change/W,
#: ``average-sqrt-lr`` too, each trainer stepping at sqrt(W) times the learning rate,
#: ``sum`` adds the whole change (Downpour), ``nesterov`` feeds change/W to an outer Nesterov
#: momentum optimizer in the coordinator (DiLoCo; :mod:`crowdd.job.outer`).
MERGES = ("average", "average-sqrt-lr", "sum", "nesterov")
MAX_STEPS_PER_FUNCTION = 1_000_000
MIN_CHUNK = 1


@dataclass(frozen=True)
class GroupSettings:
    """What the whole group must agree on besides the hyperparameters. The host decides it
    (from its ``[replication]`` and ``[job]`` config) and it travels with the job through the
    matchmaker; a worker's own config never changes it."""

    route: str = DEFAULT_ROUTE
    sync_every: int = 200
    steps_per_function: int = 200
    merge: str = "average"
    chunk_size: int = DEFAULT_CHUNK

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SETTINGS = {f for f in GroupSettings.__dataclass_fields__}


def validate_settings(d: Mapping[str, Any]) -> GroupSettings:
    """Check a group-settings mapping (from the host's hello or the group frame); the error's
    field is ``settings.NAME``."""
    if not isinstance(d, Mapping):
        raise HyperparamError("settings", "must be an object")
    unknown = sorted(set(d) - _SETTINGS)
    if unknown:
        raise HyperparamError(f"settings.{unknown[0]}", "unknown group setting")
    base = GroupSettings()
    try:
        steps = _int(d, "steps_per_function", base.steps_per_function, 1, MAX_STEPS_PER_FUNCTION)
        sync = _int(d, "sync_every", min(base.sync_every, steps), 1, MAX_STEPS_PER_FUNCTION)
        if sync > steps:
            raise HyperparamError("sync_every", f"must be <= steps_per_function ({steps}), got {sync}")
        return GroupSettings(
            route=_choice(d, "route", base.route, ROUTES),
            sync_every=sync,
            steps_per_function=steps,
            merge=_choice(d, "merge", base.merge, MERGES),
            chunk_size=_int(d, "chunk_size", base.chunk_size, MIN_CHUNK, MAX_CHUNK),
        )
    except HyperparamError as exc:
        raise HyperparamError(f"settings.{exc.field}", exc.message) from None


def check_field(name: str, value: Any) -> str | None:
    """Validate one field alone (for forms); return an error message or None."""
    try:
        validate_job({name: value} if name != "min_workers" else {name: value, "workers": MAX_WORKERS})
    except HyperparamError as exc:
        return exc.message
    return None


__all__ = [
    "GroupSettings",
    "MERGES",
    "ROUTES",
    "validate_settings",
    "Job",
    "HyperparamError",
    "validate_job",
    "check_field",
    "parse_hidden",
    "MODELS",
    "PRESETS",
    "OPTIMIZERS",
    "SHARDINGS",
    "LOSSES",
]

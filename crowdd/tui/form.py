"""The Host form's rules, without textual: parse each field's text and check it.

Numbers are parsed here; every value is then checked with
:func:`crowdd.hyperparams.check_field` and the whole job with
:func:`crowdd.hyperparams.validate_job` — the same rules the matchmaker applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdd.errors import InputError
from crowdd.hyperparams import (
    PRESETS,
    OPTIMIZERS,
    SHARDINGS,
    HyperparamError,
    Job,
    check_field,
    validate_job,
)

DATASET_SUFFIXES = (".npz", ".csv")


class FormError(InputError):
    """One field of the form is wrong; ``field`` names it."""

    field: str

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field=field)


@dataclass(frozen=True)
class FieldSpec:
    name: str
    label: str
    kind: str  # "int", "float", "text", or "choice"
    default: str
    choices: tuple[str, ...] = ()


_DEFAULT = Job()

FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("workers", "Workers wanted", "int", str(_DEFAULT.workers)),
    FieldSpec("learning_rate", "Learning rate", "float", str(_DEFAULT.learning_rate)),
    FieldSpec("batch_size", "Batch size", "int", str(_DEFAULT.batch_size)),
    FieldSpec("epochs", "Epochs", "int", str(_DEFAULT.epochs)),
    FieldSpec("hidden", "Hidden layers", "text", ",".join(str(h) for h in _DEFAULT.hidden)),
    FieldSpec("model", "Model", "choice", _DEFAULT.model, PRESETS),
    FieldSpec("sharding", "Sharding", "choice", _DEFAULT.sharding, SHARDINGS),
    FieldSpec("optimizer", "Optimizer", "choice", _DEFAULT.optimizer, OPTIMIZERS),
)
SPECS = {f.name: f for f in FIELDS}


def check_dataset(text: str) -> str | None:
    """An error message for a dataset path, or None when it can be hosted."""
    text = text.strip()
    if not text:
        return "enter the path of a .npz, a .csv or a directory of IDX files"
    path = Path(text).expanduser()
    try:
        if path.is_dir():
            return None
        if not path.exists():
            return "no such file or directory"
        if not path.is_file():
            return "not a regular file or directory"
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    if path.suffix.lower() not in DATASET_SUFFIXES:
        return "must be a .npz file, a .csv file or a directory of IDX files"
    return None


def check_model_file(text: str) -> str | None:
    """An error message for the optional model file path, or None (empty: the preset)."""
    text = text.strip()
    if not text:
        return None
    path = Path(text).expanduser()
    if path.suffix.lower() != ".keras":
        return "must be a Keras 3 .keras file (or empty for the preset model)"
    if not path.is_file():
        return "no such file"
    return None


def model_file_path(text: str) -> str | None:
    """The absolute path of the model file the form names, or None."""
    text = text.strip()
    return str(Path(text).expanduser().resolve()) if text else None


def parse_field(name: str, text: str) -> Any:
    """The value of one field from its text; raises :class:`FormError` with a clear message."""
    spec = SPECS.get(name)
    if spec is None:
        raise FormError(name, "unknown field")
    raw = text.strip()
    value: Any
    if spec.kind == "int":
        try:
            value = int(raw)
        except ValueError:
            raise FormError(name, f"must be a whole number, got {raw!r}" if raw else "enter a whole number") from None
    elif spec.kind == "float":
        try:
            value = float(raw)
        except ValueError:
            raise FormError(name, f"must be a number, got {raw!r}" if raw else "enter a number") from None
    else:
        value = raw
    message = check_field(name, value)
    if message is None and name == "workers" and value == 0:
        message = "must be at least 1: the host trains with a crowd of workers"
    if message is not None:
        raise FormError(name, message)
    return value


def field_error(name: str, text: str) -> str | None:
    """The message to show beside a field, or None when its text is fine."""
    if name == "dataset":
        return check_dataset(text)
    if name == "model_file":
        return check_model_file(text)
    try:
        parse_field(name, text)
    except FormError as exc:
        return exc.message
    return None


def build_request(values: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """(dataset path, job dict) from the form's texts; raises :class:`FormError` for the first bad field."""
    dataset = values.get("dataset", "")
    message = check_dataset(dataset)
    if message is not None:
        raise FormError("dataset", message)
    message = check_model_file(values.get("model_file", ""))
    if message is not None:
        raise FormError("model_file", message)
    job = {spec.name: parse_field(spec.name, values.get(spec.name, spec.default)) for spec in FIELDS}
    try:
        checked = validate_job(job)
    except HyperparamError as exc:
        raise FormError(exc.field, exc.message) from None
    return str(Path(dataset.strip()).expanduser().resolve()), checked.to_dict()


__all__ = ["FIELDS", "SPECS", "FieldSpec", "FormError", "build_request", "check_dataset", "check_model_file",
           "field_error", "model_file_path", "parse_field"]

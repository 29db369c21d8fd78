"""The TUI's textual-free parts: form rules, the view model, socket resolution, the adapter."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from crowdd.errors import Unavailable
from crowdd.config import Paths
from crowdd.hyperparams import Job
from crowdd.tui import SYSTEM_SOCKET, socket_path
from crowdd.client.daemon_client import ControlDaemonClient
from crowdd.tui.form import (
    FIELDS,
    FormError,
    build_request,
    check_dataset,
    field_error,
    parse_field,
)
from crowdd.tui.model import DaemonView, human_size

# ---------------------------------------------------------------------------- imports


def test_headless_modules_do_not_import_textual() -> None:
    code = (
        "import sys\n"
        "import crowdd.tui, crowdd.client.daemon_client, crowdd.tui.model, crowdd.tui.form\n"
        "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.'))\n"
        "assert not bad, bad\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------- socket path


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(socket=kw.get("socket"), root=kw.get("root"), config=None)


def test_socket_from_flag(tmp_path: Path) -> None:
    assert socket_path(_args(socket=tmp_path / "c.sock", root=tmp_path)) == tmp_path / "c.sock"


def test_socket_from_root(tmp_path: Path) -> None:
    assert socket_path(_args(root=tmp_path)) == Paths.under(tmp_path).control_socket == tmp_path / "run" / "control.sock"


def test_socket_default_is_per_user_or_system() -> None:
    user = Paths.for_user().control_socket
    expected = SYSTEM_SOCKET if not user.exists() and SYSTEM_SOCKET.exists() else user
    assert socket_path(_args()) == expected


# ---------------------------------------------------------------------------- form rules


def test_dataset_checks(tmp_path: Path) -> None:
    (tmp_path / "a.npz").write_bytes(b"x")
    (tmp_path / "b.CSV").write_text("1,2\n")
    (tmp_path / "c.txt").write_text("x")
    assert check_dataset(str(tmp_path / "a.npz")) is None
    assert check_dataset(str(tmp_path / "b.CSV")) is None
    assert check_dataset(str(tmp_path)) is None
    assert "enter the path" in (check_dataset("   ") or "")
    assert check_dataset(str(tmp_path / "missing.npz")) == "no such file or directory"
    assert "must be a .npz file" in (check_dataset(str(tmp_path / "c.txt")) or "")


def test_check_model_file(tmp_path: Path) -> None:
    from crowdd.tui.form import check_model_file, model_file_path

    assert check_model_file("") is None and model_file_path("  ") is None  # the preset
    assert check_model_file(str(tmp_path / "m.keras")) == "no such file"
    (tmp_path / "m.h5").write_bytes(b"x")
    assert "must be a Keras 3 .keras file" in (check_model_file(str(tmp_path / "m.h5")) or "")
    (tmp_path / "m.keras").write_bytes(b"x")
    assert check_model_file(str(tmp_path / "m.keras")) is None
    assert model_file_path(str(tmp_path / "m.keras")) == str((tmp_path / "m.keras").resolve())


@pytest.mark.parametrize(
    ("field", "text", "value"),
    [("workers", " 4 ", 4), ("learning_rate", "0.25", 0.25), ("batch_size", "32", 32), ("epochs", "3", 3),
     ("hidden", "128,64", "128,64"), ("optimizer", "adam", "adam")],
)
def test_parse_field_ok(field: str, text: str, value: object) -> None:
    assert parse_field(field, text) == value
    assert field_error(field, text) is None


@pytest.mark.parametrize(
    ("field", "text", "message"),
    [("workers", "x", "whole number"), ("workers", "-1", "between 0 and 1024"), ("workers", "0", "at least 1"),
     ("learning_rate", "nan", "finite"),
     ("learning_rate", "-1", "> 0"), ("epochs", "1e3", "whole number"), ("hidden", "", "non-empty"),
     ("optimizer", "rmsprop", "must be one of sgd, adam"), ("sharding", "random", "must be one of"),
     ("nonsense", "1", "unknown field")],
)
def test_parse_field_errors(field: str, text: str, message: str) -> None:
    with pytest.raises(FormError) as exc:
        parse_field(field, text)
    assert exc.value.field == field and message in exc.value.message


def test_build_request(tmp_path: Path) -> None:
    data = tmp_path / "d.npz"
    data.write_bytes(b"x")
    values = {spec.name: spec.default for spec in FIELDS} | {"dataset": str(data), "hidden": "32-16"}
    dataset, job = build_request(values)
    assert dataset == str(data.resolve())
    assert job == Job(hidden=(32, 16)).to_dict()


def test_build_request_names_the_first_bad_field(tmp_path: Path) -> None:
    with pytest.raises(FormError) as exc:
        build_request({"dataset": str(tmp_path / "nope.npz")})
    assert exc.value.field == "dataset"
    data = tmp_path / "d.npz"
    data.write_bytes(b"x")
    with pytest.raises(FormError) as exc:
        build_request({"dataset": str(data), "batch_size": "0"})
    assert exc.value.field == "batch_size"


# ---------------------------------------------------------------------------- view model


def test_view_says_why_tensorflow_does_not_train_or_runs_unprotected() -> None:
    view = DaemonView()
    idle = {"allowed": True, "rule": None, "reason": "user idle 10 min"}
    refusal = "TensorFlow cannot be sandboxed on this machine (no Landlock); not training. ..."
    view.apply_status({"state": "standby", "idle": idle, "tensorflow": {
        "confined": True, "sandboxed": False, "landlock_abi": 0, "allowed": False, "reason": refusal}})
    assert view.idle_text == f"not training: {refusal}"
    view.apply_status({"state": "standby", "idle": idle, "tensorflow": {
        "confined": False, "sandboxed": False, "landlock_abi": 0, "allowed": True, "reason": "no userns; no Landlock"}})
    assert view.idle_text == ("idle, may work: user idle 10 min · TensorFlow EXPOSED (allow_exposed_tensorflow)"
                              " · TensorFlow UNSANDBOXED (allow_unsandboxed)")


def test_view_folds_status_and_events() -> None:
    view = DaemonView()
    view.apply_status({
        "state": "waiting", "donating": True, "role": "worker", "queue": {"position": 2},
        "idle": {"allowed": False, "rule": "battery", "reason": "on battery"},
        "group": None, "training": None, "dataset": {"name": "mnist", "size": 2048},
    })
    assert view.role_text == "worker (queue position 2)"
    assert view.idle_text == "busy, not working: on battery"
    assert view.dataset_text == "mnist (2.0 KiB)"
    assert view.apply_event({"event": "state", "state": "replicating", "previous": "waiting"}) == (
        "info", "state waiting → replicating")
    view.apply_event({"event": "members", "members": [{"index": 1, "name": "b", "replication": {"done": 1, "total": 2}},
                                                       {"index": 0, "name": "a"}]})
    assert [(m.index, m.role) for m in view.members] == [(0, "host"), (1, "worker")]
    assert view.apply_event({"event": "replication", "index": 1, "done": 1, "total": 2}) is None
    assert view.apply_event({"event": "replication", "index": 1, "done": 2, "total": 2}) is not None
    assert view.members[1].done == 2
    view.apply_event({"event": "state", "state": "training", "previous": "replicating"})
    view.apply_event({"event": "progress", "epoch": 1, "epochs": 2, "step": 5, "loss": 1.5})
    view.apply_event({"event": "eval", "epoch": 1, "test_accuracy": 0.9})
    assert list(view.loss) == [1.5] and list(view.test_accuracy) == [0.9]
    view.apply_event({"event": "status", "status": {"state": "off", "donating": False}})
    assert view.state == "off" and not view.donating and view.members == []


def test_view_ignores_malformed_events() -> None:
    view = DaemonView()
    for event in ({"event": "progress", "loss": "high"}, {"event": "members", "members": "x"},
                  {"event": "replication", "index": "x"}, {"event": "unknown"}, {}):
        view.apply_event(event)
    assert list(view.loss) == [] and view.members == []


def test_human_size() -> None:
    assert human_size(10) == "10 B"
    assert human_size(55_180_000) == "52.6 MiB"


# ---------------------------------------------------------------------------- adapter, nothing listening


async def test_adapter_reports_a_missing_daemon(tmp_path: Path) -> None:
    client = ControlDaemonClient(tmp_path / "nobody.sock")
    with pytest.raises(Unavailable) as exc:
        await client.status()
    assert "crowdd daemon" in str(exc.value)
    with pytest.raises(Unavailable):
        async for _ in client.subscribe():
            pass
    await client.close()


async def test_adapter_reports_a_socket_nobody_serves(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))  # bound, never listening: connection refused
    try:
        with pytest.raises(Unavailable):
            await ControlDaemonClient(path).donate(True)
    finally:
        s.close()

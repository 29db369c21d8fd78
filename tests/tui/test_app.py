"""Pilot tests of every TUI control, against the in-memory fake daemon client."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fake_client import FakeDaemonClient, base_status, training_status
from textual.pilot import Pilot
from textual.widgets import Button, Input, Label, ProgressBar, Select, Sparkline, Switch

from crowdd.errors import ErrorCode, RemoteError
from crowdd.hyperparams import Job
from crowdd.tui.app import CrowddApp
from crowdd.tui.messages import PauseRequested
from crowdd.tui.screens import (
    ConfirmStopScreen,
    HostScreen,
    MainScreen,
    PauseScreen,
    UnavailableScreen,
)
from crowdd.tui.widgets import (
    EventLog,
    MemberRow,
    MembersPanel,
    StatusPanel,
    TrainingPanel,
)

SIZE = (80, 24)


def make_app(client: FakeDaemonClient, **kw: Any) -> CrowddApp:
    kw.setdefault("retry_interval", 0.05)
    kw.setdefault("poll_interval", 30.0)
    return CrowddApp(client, timestamp=lambda: "12:00:00", **kw)


async def until(pilot: Pilot[Any], cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for: {what}")


def text(app: CrowddApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Label).content)


def main_text(app: CrowddApp, selector: str) -> str:
    return str(app.main_screen.query_one(selector, Label).content)


async def connected(pilot: Pilot[Any], app: CrowddApp) -> None:
    await until(pilot, lambda: app.view.connected and isinstance(app.screen, MainScreen), "connected")
    await until(pilot, lambda: app.client.subscribers == 1, "subscribed")  # type: ignore[attr-defined]
    await pilot.pause()


# ---------------------------------------------------------------------------- showing the daemon


async def test_shows_status_at_80x24() -> None:
    app = make_app(FakeDaemonClient(training_status()))
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        assert main_text(app, "#state") == "training"
        assert app.main_screen.query_one("#state").has_class("state-training")
        assert main_text(app, "#donation") == "Donation ON"
        assert app.main_screen.query_one("#donate-switch", Switch).value is True
        assert "idle, may work: user idle for 12 min" in main_text(app, "#idle")
        assert main_text(app, "#role") == "host"
        assert "fashion-mnist" in main_text(app, "#dataset")
        rows = list(app.main_screen.query(MemberRow))
        assert [r.member.name for r in rows] == ["alice", "bob", "carol", "dave"]
        bars = [r.query_one(ProgressBar) for r in rows]
        assert [(b.progress, b.total) for b in bars] == [(12, 12), (12, 12), (7, 12), (2, 12)]
        assert "epoch 2/3" in main_text(app, "#progress-text")
        assert "2,346 samples/s" in main_text(app, "#rate")
        # every panel and the action row is on screen, with room to show something
        for widget in (StatusPanel, TrainingPanel, MembersPanel, EventLog):
            region = app.main_screen.query_one(widget).region
            assert region.width >= 30 and region.height >= 4, (widget, region)
            assert region.right <= SIZE[0] and region.bottom <= SIZE[1]
        for button in ("#host", "#work", "#pause", "#stop"):
            region = app.main_screen.query_one(button).region
            assert region.height == 1 and region.bottom <= SIZE[1] - 1


async def test_state_colour_follows_state() -> None:
    client = FakeDaemonClient(base_status(state="standby", donating=True))
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        state = app.main_screen.query_one("#state")
        assert state.has_class("state-standby")
        client.emit("state", state="replicating", previous="standby")
        await until(pilot, lambda: state.has_class("state-replicating"), "replicating colour")
        assert not state.has_class("state-standby")


async def test_events_update_the_widgets() -> None:
    client = FakeDaemonClient(base_status(state="waiting", donating=True, role="worker", queue={"position": 3}))
    app = make_app(client)
    async with app.run_test(size=(120, 40)) as pilot:
        await connected(pilot, app)
        assert "queue position 3" in main_text(app, "#role")
        members = [
            {"index": 0, "name": "host-a", "role": "host", "state": "replicating", "replication": {"done": 4, "total": 4}},
            {"index": 1, "name": "me", "role": "worker", "state": "replicating", "replication": {"done": 0, "total": 4}},
        ]
        client.emit("state", state="replicating", previous="waiting")
        client.emit("members", members=members)
        client.emit("replication", index=1, done=3, total=4, source=0)
        await until(pilot, lambda: len(app.main_screen.query(MemberRow)) == 2, "two member rows")

        def member_bar(index: int) -> ProgressBar:
            (row,) = [r for r in app.main_screen.query(MemberRow) if r.member.index == index]
            return row.query_one(ProgressBar)

        await until(pilot, lambda: member_bar(1).progress == 3, "replication progress")
        assert main_text(app, "#state") == "replicating"
        client.emit("replication", index=1, done=4, total=4, source=0)

        client.emit("state", state="training", previous="replicating")
        for step, loss in enumerate([2.0, 1.5, 1.0, 0.7], start=1):
            client.emit("progress", epoch=1, epochs=2, step=step * 10, loss=loss, accuracy=0.5, samples_per_sec=1000.0)
        client.emit("eval", epoch=1, step=40, test_accuracy=0.81, test_loss=0.6)
        await until(pilot, lambda: list(app.main_screen.query_one("#acc-plot", Sparkline).data or []) == [0.81],
                    "accuracy plot")
        assert list(app.main_screen.query_one("#loss-plot", Sparkline).data or []) == [2.0, 1.5, 1.0, 0.7]
        assert "epoch 1/2" in main_text(app, "#progress-text")
        assert "step 40" in main_text(app, "#progress-text")
        assert "1,000 samples/s" in main_text(app, "#rate")
        assert "0.7000" in main_text(app, "#loss-text")
        assert "0.8100" in main_text(app, "#acc-text")

        client.emit("result", test_accuracy=0.8765, model_path="/tmp/model.keras")
        client.emit("state", state="finished", previous="training")
        client.emit("log", level="warning", message="worker 2 dropped")
        await until(pilot, lambda: main_text(app, "#state") == "finished", "finished")
        bar = app.main_screen.query_one("#epoch-bar", ProgressBar)
        assert bar.progress == bar.total == 2
        assert "test acc 0.8765" in main_text(app, "#progress-text")
        log = app.main_screen.query_one(EventLog)
        lines = " ".join(" ".join(line.text for line in log.lines).split())
        for expected in ("waiting → replicating", "group has 2 members", "node 1 holds the dataset (4 chunks)",
                         "test accuracy 0.8100", "training finished: test accuracy 0.8765", "worker 2 dropped"):
            assert expected in lines, expected


async def test_an_expelled_member_shows_as_such_with_the_reason() -> None:
    """The host expelled worker 2: its row says so (the reason in its tooltip) and the event
    log carries the host's line with the reason; a peer-chosen reason is not markup."""
    client = FakeDaemonClient(base_status(state="training", donating=True, role="host"))
    app = make_app(client)
    why = "3 of its last 4 changes were rejected (most raised the validation loss) [/x]"
    async with app.run_test(size=(120, 40)) as pilot:
        await connected(pilot, app)
        members = [
            {"index": 0, "name": "me", "role": "host", "state": "training", "replication": {"done": 4, "total": 4}},
            {"index": 2, "name": "w2", "role": "worker", "state": "expelled", "note": why,
             "replication": {"done": 4, "total": 4}},
        ]
        client.emit("members", members=members)
        client.emit("log", level="warning", message=f"worker 2 (w2) expelled: {why}")
        await until(pilot, lambda: len(app.main_screen.query(MemberRow)) == 2, "two member rows")
        (row,) = [r for r in app.main_screen.query(MemberRow) if r.member.index == 2]
        await until(pilot, lambda: "expelled" in str(row.query_one(".member-label", Label).content), "expelled row")
        assert str(row.tooltip) == f"expelled: {why}"
        log = app.main_screen.query_one(EventLog)
        await until(pilot, lambda: "worker 2 (w2) expelled" in " ".join(line.text for line in log.lines), "log line")
        assert why in " ".join(" ".join(line.text for line in log.lines).split())


async def test_peer_chosen_names_are_shown_as_text_never_run_as_markup() -> None:
    """A group member named ``[/x]`` (a closing tag with nothing open: markup would raise) and a
    host's dataset named with a ``@click`` action: the TUI stays up and shows both literally."""
    client = FakeDaemonClient(base_status(state="training", donating=True, role="worker",
                                          dataset={"name": "[@click=app.quit]evil[/]", "size": 1000, "digest": "ab" * 32}))
    app = make_app(client)
    async with app.run_test(size=(120, 40)) as pilot:
        await connected(pilot, app)
        members = [
            {"index": 0, "name": "[/x]", "role": "host", "state": "training", "replication": {"done": 4, "total": 4}},
            {"index": 1, "name": "[b]me", "role": "worker", "state": "training", "replication": {"done": 4, "total": 4}},
        ]
        client.emit("members", members=members)
        await until(pilot, lambda: len(app.main_screen.query(MemberRow)) == 2, "two member rows")
        await pilot.pause()
        labels = [str(r.query_one(".member-label", Label).content) for r in app.main_screen.query(MemberRow)]
        assert any("[/x]" in t for t in labels) and any("[b]me" in t for t in labels), labels
        assert main_text(app, "#dataset").startswith("[@click=app.quit]evil[/]"), main_text(app, "#dataset")
        assert app.is_running
        # the control: the app's own styled text still renders (the state label)
        assert main_text(app, "#state") == "training"


# ---------------------------------------------------------------------------- donation


async def test_donation_switch_turns_donation_on_and_off() -> None:
    client = FakeDaemonClient(base_status())
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        assert main_text(app, "#donation") == "Donation OFF"
        await pilot.click("#donate-switch")
        await until(pilot, lambda: ("donate", True) in client.calls, "donate on sent")
        await until(pilot, lambda: main_text(app, "#state") == "standby", "standby shown")
        assert main_text(app, "#donation") == "Donation ON"
        assert app.main_screen.query_one("#donate-switch", Switch).value is True
        await pilot.click("#donate-switch")
        await until(pilot, lambda: ("donate", False) in client.calls, "donate off sent")
        await until(pilot, lambda: main_text(app, "#state") == "off", "off shown")
        assert main_text(app, "#donation") == "Donation OFF"
        assert [c for c in client.calls if c[0] == "donate"] == [("donate", True), ("donate", False)]


async def test_d_key_toggles_donation() -> None:
    client = FakeDaemonClient(base_status())
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.press("d")
        await until(pilot, lambda: main_text(app, "#donation") == "Donation ON", "donation on")
        await until(pilot, lambda: main_text(app, "#state") == "standby", "standby")
        await pilot.press("d")
        await until(pilot, lambda: main_text(app, "#donation") == "Donation OFF", "donation off")
        assert [c for c in client.calls if c[0] == "donate"] == [("donate", True), ("donate", False)]


async def test_work_button_donates() -> None:
    client = FakeDaemonClient(base_status())
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.click("#work")
        await until(pilot, lambda: ("donate", True) in client.calls, "donate on sent")
        await until(pilot, lambda: main_text(app, "#donation") == "Donation ON", "donation on")


async def test_refused_donation_puts_the_switch_back() -> None:
    client = FakeDaemonClient(base_status())
    app = make_app(client)

    async def refuse(on: bool) -> dict[str, Any]:
        raise RemoteError("the daemon is shutting down", code=ErrorCode("busy"))

    client.donate = refuse  # type: ignore[method-assign]
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.click("#donate-switch")
        log = app.main_screen.query_one(EventLog)
        await until(pilot, lambda: any("shutting down" in line.text for line in log.lines), "error logged")
        assert app.main_screen.query_one("#donate-switch", Switch).value is False
        assert main_text(app, "#donation") == "Donation OFF"


# ---------------------------------------------------------------------------- host form


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "mnist.npz"
    path.write_bytes(b"not really, but the form only checks the name")
    return path


async def open_form(pilot: Pilot[Any], app: CrowddApp) -> HostScreen:
    await pilot.press("h")
    await until(pilot, lambda: isinstance(app.screen, HostScreen), "host form")
    await pilot.pause()
    assert isinstance(app.screen, HostScreen)
    return app.screen


async def fill(pilot: Pilot[Any], form: HostScreen, field: str, value: str, *, type_it: bool = True) -> None:
    """Clear a field and type ``value`` key by key (or set it at once, for long paths)."""
    widget = form.query_one(f"#field-{field}", Input)
    widget.focus()
    widget.value = ""
    await pilot.pause()
    if not type_it:
        widget.value = value
    elif value:
        await pilot.press(*value)
    await pilot.pause()


async def test_host_form_valid(dataset: Path) -> None:
    client = FakeDaemonClient(base_status(state="standby", donating=True))
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        form = await open_form(pilot, app)
        await fill(pilot, form, "dataset", str(dataset))
        assert str(form.query_one("#msg-dataset", Label).content) == (
            ".npz, .csv, an IDX directory, or a folder of class folders of images")
        await fill(pilot, form, "workers", "3")
        await fill(pilot, form, "learning_rate", "0.1")
        await fill(pilot, form, "batch_size", "64")
        await fill(pilot, form, "epochs", "2")
        await fill(pilot, form, "hidden", "128,64")
        form.query_one("#field-optimizer", Select).value = "adam"
        form.query_one("#field-sharding", Select).value = "overlap"
        await pilot.pause()
        await pilot.click("#host-submit")
        await until(pilot, lambda: any(c[0] == "host" for c in client.calls), "host sent")
        await until(pilot, lambda: isinstance(app.screen, MainScreen), "form closed")
        (_, sent_path, job), = [c for c in client.calls if c[0] == "host"]
        assert sent_path == str(dataset.resolve())
        expected = Job(workers=3, learning_rate=0.1, batch_size=64, epochs=2, hidden=(128, 64),
                       optimizer="adam", sharding="overlap").to_dict()
        assert job == expected
        await until(pilot, lambda: main_text(app, "#state") == "registering", "registering")
        assert main_text(app, "#role") == "host"


async def test_host_form_sends_the_hosts_model_file(dataset: Path, tmp_path: Path) -> None:
    client = FakeDaemonClient(base_status(state="standby", donating=True))
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        form = await open_form(pilot, app)
        await fill(pilot, form, "dataset", str(dataset), type_it=False)  # long paths: set at once
        await fill(pilot, form, "model_file", str(tmp_path / "missing.keras"), type_it=False)
        assert "no such file" in str(form.query_one("#msg-model_file", Label).content)
        await fill(pilot, form, "model_file", str(dataset), type_it=False)
        assert "must be a Keras 3 .keras file" in str(form.query_one("#msg-model_file", Label).content)
        await pilot.click("#host-submit")
        await pilot.pause()
        assert not any(c[0] == "host" for c in client.calls)
        model = tmp_path / "mine.keras"
        model.write_bytes(b"zip")
        await fill(pilot, form, "model_file", str(model), type_it=False)
        assert str(form.query_one("#msg-model_file", Label).content) == ""
        await pilot.click("#host-submit")
        await until(pilot, lambda: any(c[0] == "host" for c in client.calls), "host sent")
        (_, sent_path, _job, sent_model), = [c for c in client.calls if c[0] == "host"]
        assert sent_path == str(dataset.resolve()) and sent_model == str(model.resolve())


async def test_host_form_directory_dataset_and_enter_submits(tmp_path: Path) -> None:
    client = FakeDaemonClient(base_status(state="standby", donating=True))
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        form = await open_form(pilot, app)
        await fill(pilot, form, "dataset", str(tmp_path), type_it=False)
        await pilot.press("enter")
        await until(pilot, lambda: any(c[0] == "host" for c in client.calls), "host sent")
        (_, sent_path, job), = [c for c in client.calls if c[0] == "host"]
        assert sent_path == str(tmp_path.resolve())
        assert job == Job().to_dict()


INVALID = [
    ("dataset", "", "enter the path"),
    ("dataset", "/nonexistent/crowdd/data.npz", "no such file or directory"),
    ("dataset", "WRONG_SUFFIX", "must be a .npz file, a .csv file or a directory"),
    ("workers", "two", "must be a whole number"),
    ("workers", "2000", "must be between 0 and 1024"),
    ("learning_rate", "fast", "must be a number"),
    ("learning_rate", "0", "must be > 0"),
    ("learning_rate", "1000", "must be > 0 and <= 100"),
    ("batch_size", "0", "must be between 1 and"),
    ("batch_size", "1.5", "must be a whole number"),
    ("epochs", "0", "must be between 1 and 10000"),
    ("epochs", "", "enter a whole number"),
    ("hidden", "a,b", "must be layer sizes like 128,64"),
    ("hidden", "0", "each layer size must be an integer"),
    ("hidden", ",".join(["8"] * 17), "at most 16 layers"),
]


@pytest.mark.parametrize(("field", "value", "message"), INVALID, ids=[f"{f}={v or 'empty'}" for f, v, _ in INVALID])
async def test_host_form_invalid_input_shows_message(
    field: str, value: str, message: str, dataset: Path, tmp_path: Path
) -> None:
    if value == "WRONG_SUFFIX":
        wrong = tmp_path / "notes.txt"
        wrong.write_text("x")
        value = str(wrong)
    client = FakeDaemonClient(base_status(state="standby", donating=True))
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        form = await open_form(pilot, app)
        if field != "dataset":
            await fill(pilot, form, "dataset", str(dataset), type_it=False)
        await fill(pilot, form, field, value, type_it=len(value) < 20)
        msg = form.query_one(f"#msg-{field}", Label)
        if value:  # typed: the message shows as you type
            assert message in str(msg.content)
            assert msg.has_class("error")
        await pilot.click("#host-submit")
        await pilot.pause()
        assert message in str(msg.content)
        assert msg.has_class("error")
        assert message in text(app, "#form-status")
        assert isinstance(app.screen, HostScreen)
        assert not any(c[0] == "host" for c in client.calls)
        # the message is visible beside (or just under) its field
        field_region = form.query_one(f"#field-{field}").region
        assert msg.region.height >= 1 and abs(msg.region.y - field_region.y) <= 1


async def test_host_form_clears_message_when_fixed(dataset: Path) -> None:
    app = make_app(FakeDaemonClient(base_status()))
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        form = await open_form(pilot, app)
        await fill(pilot, form, "epochs", "0")
        msg = form.query_one("#msg-epochs", Label)
        assert msg.has_class("error")
        await fill(pilot, form, "epochs", "5")
        assert not msg.has_class("error") and str(msg.content) == ""


async def test_host_refused_by_daemon_shows_its_message(dataset: Path) -> None:
    client = FakeDaemonClient(base_status(state="standby", donating=True))
    client.host_error = RemoteError("cannot read the dataset: permission denied", field="dataset", code=ErrorCode("bad_field"))
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        form = await open_form(pilot, app)
        await fill(pilot, form, "dataset", str(dataset), type_it=False)
        await pilot.click("#host-submit")
        msg = form.query_one("#msg-dataset", Label)
        await until(pilot, lambda: "permission denied" in str(msg.content), "daemon's message beside the field")
        assert isinstance(app.screen, HostScreen)
        assert not form.query_one("#host-submit").disabled


async def test_host_form_cancel(dataset: Path) -> None:
    client = FakeDaemonClient(base_status())
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await open_form(pilot, app)
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, MainScreen), "form closed")
        await open_form(pilot, app)
        await pilot.click("#host-cancel")
        await until(pilot, lambda: isinstance(app.screen, MainScreen), "form closed")
        assert not any(c[0] == "host" for c in client.calls)


async def test_host_button_opens_form() -> None:
    app = make_app(FakeDaemonClient(base_status()))
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.click("#host")
        await until(pilot, lambda: isinstance(app.screen, HostScreen), "host form")


# ---------------------------------------------------------------------------- stop


@pytest.mark.parametrize("how", ["key-y", "button"])
async def test_stop_confirmed(how: str) -> None:
    client = FakeDaemonClient(training_status())
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, ConfirmStopScreen), "confirmation")
        assert not any(c[0] == "stop" for c in client.calls)
        # a host is warned that the whole group's training ends, and that its model is kept
        said = " ".join(str(label.render()) for label in app.screen.query(Label))
        assert "ends the whole group's training" in said and "model trained so far" in said
        if how == "key-y":
            await pilot.press("y")
        else:
            await pilot.click("#confirm-stop")
        await until(pilot, lambda: ("stop",) in client.calls, "stop sent")
        await until(pilot, lambda: main_text(app, "#state") == "standby", "standby after stop")
        assert isinstance(app.screen, MainScreen)


@pytest.mark.parametrize("how", ["key-n", "escape", "button"])
async def test_stop_cancelled(how: str) -> None:
    client = FakeDaemonClient(training_status())
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.click("#stop")
        await until(pilot, lambda: isinstance(app.screen, ConfirmStopScreen), "confirmation")
        if how == "key-n":
            await pilot.press("n")
        elif how == "escape":
            await pilot.press("escape")
        else:
            await pilot.click("#confirm-cancel")
        await until(pilot, lambda: isinstance(app.screen, MainScreen), "back to main")
        await pilot.pause(0.1)
        assert ("stop",) not in client.calls
        assert main_text(app, "#state") == "training"


# ---------------------------------------------------------------------------- pause / resume


@pytest.mark.parametrize(("how", "hours"), [("default-enter", 1.0), ("typed", 2.5), ("choice", 8.0), ("button", 0.5)])
async def test_pause_asks_how_long_then_pauses(how: str, hours: float) -> None:
    client = FakeDaemonClient(base_status(state="training", donating=True, role="worker"))
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        assert str(app.main_screen.query_one("#pause", Button).label) == "Pause…"
        if how == "button":
            await pilot.click("#pause")
        else:
            await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, PauseScreen), "pause dialog")
        assert not any(c[0] == "pause" for c in client.calls)
        if how == "typed":
            app.screen.query_one("#pause-duration", Input).value = "2h30m"
            await pilot.press("enter")
        elif how == "choice":
            await pilot.click("#pause-8h")
        elif how == "button":
            app.screen.query_one("#pause-duration", Input).value = "30m"
            await pilot.click("#pause-ok")
        else:
            await pilot.press("enter")  # the default, 1 h
        await until(pilot, lambda: ("pause", hours) in client.calls, f"pause {hours} h sent")
        assert isinstance(app.screen, MainScreen)
        await until(pilot, lambda: "paused until" in main_text(app, "#idle"), "the idle row shows the pause")
        assert str(app.main_screen.query_one("#pause", Button).label) == "Resume"
        # p again resumes, without a dialog
        await pilot.press("p")
        await until(pilot, lambda: ("resume",) in client.calls, "resume sent")
        await until(pilot, lambda: "paused until" not in main_text(app, "#idle"), "pause gone")
        assert str(app.main_screen.query_one("#pause", Button).label) == "Pause…"
        assert isinstance(app.screen, MainScreen)


@pytest.mark.parametrize("bad", ["2x", "0", "-1h", "400d", ""])
async def test_pause_dialog_refuses_a_bad_duration(bad: str) -> None:
    client = FakeDaemonClient(base_status(state="standby", donating=True))
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, PauseScreen), "pause dialog")
        app.screen.query_one("#pause-duration", Input).value = bad
        await pilot.press("enter")
        await until(pilot, lambda: text(app, "#pause-error") != "", "an error under the field")
        assert "a pause" in text(app, "#pause-error") or "expected a duration" in text(app, "#pause-error")
        assert isinstance(app.screen, PauseScreen) and not any(c[0] == "pause" for c in client.calls)
        app.screen.query_one("#pause-duration", Input).value = "1h"  # fixing it clears the message
        await pilot.pause()
        assert text(app, "#pause-error") == ""
        await pilot.press("escape")  # cancel: nothing sent
        await until(pilot, lambda: isinstance(app.screen, MainScreen), "back to main")
        await pilot.pause(0.1)
        assert not any(c[0] == "pause" for c in client.calls)


async def test_paused_daemon_shows_until_when_and_the_resume_button() -> None:
    until_ = time.time() + 2 * 3600 + 30
    client = FakeDaemonClient(base_status(state="standby", donating=True, idle={
        "allowed": False, "rule": "paused", "reason": "paused by the user", "paused_until": until_}))
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        same_day = time.localtime(until_)[:3] == time.localtime()[:3]  # past midnight it names the day
        when = time.strftime("%H:%M" if same_day else "%a %H:%M", time.localtime(until_))
        assert main_text(app, "#idle").startswith(f"paused until {when} (2 h left)")
        assert str(app.main_screen.query_one("#pause", Button).label) == "Resume"
        await pilot.click("#pause")
        await until(pilot, lambda: ("resume",) in client.calls, "resume sent")


async def test_refused_pause_is_shown() -> None:
    client = FakeDaemonClient(base_status(state="standby", donating=True))
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        app.post_message(PauseRequested(-1.0))  # as if a dialog let it through: the daemon refuses
        log = app.main_screen.query_one(EventLog)
        await until(pilot, lambda: any("pause failed" in line.text and "hours" in line.text for line in log.lines),
                    "the refusal in the log")
        assert client.state["idle"]["paused_until"] is None


# ---------------------------------------------------------------------------- quitting, daemon away


async def test_q_quits_and_leaves_the_daemon_alone() -> None:
    client = FakeDaemonClient(training_status())
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0
    assert client.closed
    assert [c for c in client.calls if c[0] != "status"] == []  # no stop, no donate


async def test_daemon_not_running_then_recovers() -> None:
    client = FakeDaemonClient(base_status(state="standby", donating=True), available=False)
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, UnavailableScreen), "unavailable screen")
        assert "not running" in text(app, ".dialog-title")
        assert "crowdd daemon" in text(app, "#unavailable-hint")
        assert "systemctl start crowdd" in text(app, "#unavailable-hint")
        assert client.where in text(app, "#unavailable-where")
        assert "connection refused" in text(app, "#unavailable-reason")
        await pilot.press("d")  # no donation controls here
        await pilot.pause(0.2)
        assert not any(c[0] == "donate" for c in client.calls)
        client.come_back()
        await until(pilot, lambda: isinstance(app.screen, MainScreen), "main screen again")
        await until(pilot, lambda: main_text(app, "#state") == "standby", "status shown")
        await until(pilot, lambda: client.subscribers == 1, "subscribed")


async def test_daemon_goes_away_then_comes_back() -> None:
    client = FakeDaemonClient(training_status())
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        client.go_down()
        await until(pilot, lambda: isinstance(app.screen, UnavailableScreen), "unavailable screen")
        log = app.main_screen.query_one(EventLog)
        assert any("lost the connection" in line.text for line in log.lines)
        client.come_back()
        client.state["state"] = "standby"
        await until(pilot, lambda: isinstance(app.screen, MainScreen), "main screen again")
        await until(pilot, lambda: main_text(app, "#state") == "standby", "fresh status")
        await until(pilot, lambda: client.subscribers == 1, "resubscribed")
        client.emit("state", state="registering", previous="standby")
        await until(pilot, lambda: main_text(app, "#state") == "registering", "events flow again")


async def test_daemon_goes_away_while_a_dialog_is_open() -> None:
    client = FakeDaemonClient(training_status())
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, ConfirmStopScreen), "confirmation")
        client.go_down()
        await until(pilot, lambda: isinstance(app.screen, UnavailableScreen), "unavailable screen")
        client.come_back()
        await until(pilot, lambda: not isinstance(app.screen, UnavailableScreen), "recovered")


async def test_unexpected_client_error_is_shown_not_raised() -> None:
    client = FakeDaemonClient(base_status())

    async def broken() -> dict[str, Any]:
        raise RuntimeError("socket exploded")

    client.status = broken  # type: ignore[method-assign]
    app = make_app(client)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, UnavailableScreen), "unavailable screen")
        assert "socket exploded" in text(app, "#unavailable-reason")
    assert app.return_code in (0, None)


async def test_retry_key_polls_now() -> None:
    client = FakeDaemonClient(base_status(), available=False)
    app = make_app(client, retry_interval=60.0)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, UnavailableScreen), "unavailable screen")
        client.come_back()
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, MainScreen), "main screen after retry", timeout=5)

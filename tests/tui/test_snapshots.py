"""Snapshot tests of the TUI's main views at 80×24 and at a larger size.

Fixed data from the fake client, a fixed log timestamp, no ETA or indeterminate bars, so
every frame is the same on every run. Regenerate after an intended change with
``pytest tests/tui/test_snapshots.py --snapshot-update`` and review the SVGs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fake_client import FakeDaemonClient, base_status, training_status
from textual.pilot import Pilot
from textual.widgets import Input

from crowdd.tui.app import CrowddApp
from crowdd.tui.screens import (
    ConfirmStopScreen,
    HostScreen,
    MainScreen,
    PauseScreen,
    UnavailableScreen,
)
from crowdd.tui.widgets import EventLog

SIZES = [(80, 24), (120, 36)]
SIZE_IDS = ["80x24", "120x36"]


def make_app(client: FakeDaemonClient) -> CrowddApp:
    return CrowddApp(client, poll_interval=3600.0, retry_interval=3600.0, timestamp=lambda: "12:00:00")


async def until(pilot: Pilot[Any], cond: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if cond():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for: {what}")


def after_connect(
    client: FakeDaemonClient, then: Callable[[Pilot[Any], CrowddApp], Awaitable[None]] | None = None
) -> Callable[[Pilot[Any]], Awaitable[None]]:
    async def run_before(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, CrowddApp)
        await until(pilot, lambda: app.view.connected and client.subscribers == 1, "connected")
        if then is not None:
            await then(pilot, app)
        # a last event, so we know every earlier one has been shown
        client.emit("log", level="info", message="snapshot")
        log = app.main_screen.query_one(EventLog)
        await until(pilot, lambda: any("snapshot" in line.text for line in log.lines), "events delivered")
        await pilot.pause(0.05)
        await pilot.wait_for_scheduled_animations()
        await pilot.pause()

    return run_before


def training_client() -> FakeDaemonClient:
    return FakeDaemonClient(training_status())


async def training_events(pilot: Pilot[Any], app: CrowddApp) -> None:
    client = app.client
    assert isinstance(client, FakeDaemonClient)
    losses = [2.3, 1.9, 1.4, 1.1, 0.9, 0.8, 0.7, 0.65, 0.6, 0.58, 0.55, 0.52, 0.5, 0.49, 0.47, 0.45]
    for step, loss in enumerate(losses, start=1):
        client.emit("progress", epoch=2, epochs=3, step=1200 + step * 10, loss=loss, accuracy=0.8,
                    samples_per_sec=2345.6)
        if step % 4 == 0:
            client.emit("eval", epoch=2, step=1200 + step * 10, test_accuracy=0.6 + step * 0.015, test_loss=0.5)
    client.emit("replication", index=2, done=9, total=12, source=0)
    client.emit("log", level="warning", message="node 3 is slow to replicate")


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_main_training(snap_compare: Any, size: tuple[int, int]) -> None:
    client = training_client()
    assert snap_compare(make_app(client), terminal_size=size, run_before=after_connect(client, training_events))


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_main_donation_off(snap_compare: Any, size: tuple[int, int]) -> None:
    client = FakeDaemonClient(base_status(idle={"allowed": False, "rule": "cpu", "reason": "other processes use 64% CPU"}))
    assert snap_compare(make_app(client), terminal_size=size, run_before=after_connect(client))


async def _invalid_form(pilot: Pilot[Any], app: CrowddApp) -> None:
    await pilot.press("h")
    await until(pilot, lambda: isinstance(app.screen, HostScreen), "host form")
    await pilot.pause()
    form = app.screen
    for widget in form.query(Input):
        widget.cursor_blink = False  # a blinking cursor would make the frame depend on the clock
    await pilot.press(*"data/missing.npz")
    epochs = form.query_one("#field-epochs", Input)
    epochs.focus()
    epochs.value = "0"
    await pilot.pause()
    form.query_one("#field-dataset", Input).focus()
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_host_form_with_errors(snap_compare: Any, size: tuple[int, int]) -> None:
    client = FakeDaemonClient(base_status(state="standby", donating=True))
    assert snap_compare(make_app(client), terminal_size=size, run_before=after_connect(client, _invalid_form))


async def _confirm(pilot: Pilot[Any], app: CrowddApp) -> None:
    await pilot.press("s")
    await until(pilot, lambda: isinstance(app.screen, ConfirmStopScreen), "confirmation")


def test_stop_confirmation(snap_compare: Any) -> None:
    client = training_client()
    assert snap_compare(make_app(client), terminal_size=(80, 24), run_before=after_connect(client, _confirm))


async def _pause_dialog(pilot: Pilot[Any], app: CrowddApp) -> None:
    await pilot.press("p")
    await until(pilot, lambda: isinstance(app.screen, PauseScreen), "pause dialog")
    app.screen.query_one("#pause-duration", Input).value = "2x"
    await pilot.press("enter")
    await until(pilot, lambda: "expected a duration" in str(app.screen.query_one("#pause-error").render()), "error")


def test_pause_dialog_with_an_error(snap_compare: Any) -> None:
    client = training_client()
    assert snap_compare(make_app(client), terminal_size=(80, 24), run_before=after_connect(client, _pause_dialog))


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_daemon_not_running(snap_compare: Any, size: tuple[int, int]) -> None:
    client = FakeDaemonClient(base_status(), available=False)

    async def run_before(pilot: Pilot[Any]) -> None:
        await until(pilot, lambda: isinstance(pilot.app.screen, UnavailableScreen), "unavailable screen")
        await pilot.pause()

    assert snap_compare(make_app(client), terminal_size=size, run_before=run_before)


def test_main_screen_is_the_default() -> None:
    app = make_app(training_client())
    assert isinstance(app.get_default_screen(), MainScreen)

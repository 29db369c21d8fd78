"""The donation switch and the pause: set, shown, kept across a restart (a new switch on the
same state directory), an ended or unreadable pause ignored, an unwritable file survived."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from crowdd.idle.policy import AlwaysIdle
from crowdd.node.donation import STATE_FILE, DonationSwitch
from crowdd.node.states import StateMachine
from crowdd.node.status import StatusView
from crowdd.platform.systemd import Notifier


def switch(state: Path) -> tuple[DonationSwitch, StatusView, AlwaysIdle]:
    view = StatusView("n", StateMachine(lambda old, new: None), lambda *a, **k: None, Notifier())
    policy = AlwaysIdle()
    return DonationSwitch(state, policy, view), view, policy


def test_a_new_install_starts_off_and_the_switch_is_kept(tmp_path: Path) -> None:
    d, view, _ = switch(tmp_path)
    d.load()
    assert not d.on and not view.donating
    assert d.switch(True) and not d.switch(True)  # changed once
    assert view.donating
    again, view2, _ = switch(tmp_path)
    again.load()
    assert again.on and view2.donating


def test_a_pause_is_shown_kept_and_holds_again_after_a_restart(tmp_path: Path) -> None:
    d, view, policy = switch(tmp_path)
    d.load()
    until = d.pause(2.0)
    assert until is not None and view.paused_until == until == policy.paused_until
    assert abs(until - (time.time() + 7200)) < 5
    again, view2, policy2 = switch(tmp_path)
    again.load()
    assert policy2.paused_until is not None and abs(policy2.paused_until - until) < 1
    assert view2.paused_until == policy2.paused_until
    assert again.resume() and not again.resume()
    assert policy2.paused_until is None and view2.paused_until is None
    third, _, policy3 = switch(tmp_path)
    third.load()
    assert policy3.paused_until is None


def test_a_bad_duration_is_refused_and_nothing_is_kept(tmp_path: Path) -> None:
    d, view, policy = switch(tmp_path)
    d.load()
    with pytest.raises(ValueError):
        d.pause(-1)
    assert policy.paused_until is None and view.paused_until is None
    assert not (tmp_path / STATE_FILE).exists()


@pytest.mark.parametrize("saved", [
    {"donating": True, "paused_until": 1.0},  # ended long ago
    {"donating": True, "paused_until": "soon"},
    {"donating": True, "paused_until": True},
    {"donating": True, "paused_until": float("inf")},
])
def test_an_ended_or_unreadable_pause_is_ignored(tmp_path: Path, saved: dict[str, object]) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps(saved))
    d, view, policy = switch(tmp_path)
    d.load()
    assert d.on and policy.paused_until is None and view.paused_until is None


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"on"'])
def test_an_unreadable_file_starts_off(tmp_path: Path, text: str) -> None:
    (tmp_path / STATE_FILE).write_text(text)
    d, _, _ = switch(tmp_path)
    d.load()
    assert not d.on


def test_an_unwritable_state_directory_keeps_the_switch_for_this_run(tmp_path: Path) -> None:
    d, view, _ = switch(tmp_path / "gone")  # nowhere to save: logged, not raised
    d.load()
    assert d.switch(True) and view.donating and d.on

"""The daemon's hold on a cycle's session (TF-free): ``crowdd stop`` on a host mid-training
asks its job to stop early; a worker's away/back reach its host while its channel is up."""

from __future__ import annotations

from pathlib import Path

from crowdd.job import STOP_FILE
from crowdd.node.handle import SessionHandle


def test_no_job_training_means_a_hard_stop() -> None:
    h = SessionHandle()
    assert h.stop() is False and not h.stop_requested


def test_a_training_job_is_asked_through_its_stop_file(tmp_path: Path) -> None:
    h = SessionHandle()
    h.arm_stop(tmp_path)
    assert h.stop() is True and (tmp_path / STOP_FILE).exists() and h.stop_requested
    h.arm_stop(None)  # the job ended
    assert h.stop() is False


def test_an_unwritable_work_dir_falls_back_to_a_hard_stop(tmp_path: Path) -> None:
    h = SessionHandle()
    h.arm_stop(tmp_path / "gone")
    assert h.stop() is False


def test_away_and_back_reach_the_host_only_while_the_channel_is_up() -> None:
    said: list[tuple[str, ...]] = []
    h = SessionHandle()
    h.away("the volunteer is typing")  # no channel yet: kept
    assert said == [] and h.away_reason == "the volunteer is typing"
    h.bind_presence(lambda reason, staying: said.append(("away", reason, str(staying))), lambda: said.append(("back",)))
    assert said == [("away", "the volunteer is typing", "True")]  # said again once the channel is up
    h.back()
    h.back()  # only once: it was not away
    assert said[1:] == [("back",)]
    h.bind_presence(None, None)  # the channel broke
    h.away("busy", staying=False)  # a goodbye: nothing to say it on, and nothing to repeat
    assert len(said) == 2 and h.away_reason is None

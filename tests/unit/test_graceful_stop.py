"""``crowdd stop`` on a host mid-training asks its job to stop early (TF-free)."""

from __future__ import annotations

from pathlib import Path

from crowdd.job import STOP_FILE
from crowdd.node.host import GracefulStop


def test_no_job_training_means_a_hard_stop() -> None:
    g = GracefulStop()
    assert g.request() is False and not g.requested


def test_a_training_job_is_asked_through_its_stop_file(tmp_path: Path) -> None:
    g = GracefulStop()
    g.arm(tmp_path)
    assert g.request() is True and (tmp_path / STOP_FILE).exists() and g.requested
    g.arm(None)  # the job ended
    assert g.request() is False


def test_an_unwritable_work_dir_falls_back_to_a_hard_stop(tmp_path: Path) -> None:
    g = GracefulStop()
    g.arm(tmp_path / "gone")
    assert g.request() is False

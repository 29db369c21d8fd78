"""JobLauncher: the plan's group-wide settings over this node's local ones."""

from __future__ import annotations

import sys
from pathlib import Path

from crowdd.hyperparams import GroupSettings, Job
from crowdd.job.spec import Settings
from crowdd.node.launcher import JobLauncher
from crowdd.plan import DatasetRef, MemberPorts, PlanMember, SessionPlan


def plan(index: int) -> SessionPlan:
    members = (PlanMember(0, "host", "h", "127.0.0.1", MemberPorts(1, 2, (3, 4))),
               PlanMember(1, "worker", "w", "127.0.0.1", MemberPorts(5, 6, (7,))))
    return SessionPlan("abc", "t" * 64, index, members, Job(), DatasetRef("0" * 64, 1, "d"),
                       GroupSettings(route="star", sync_every=7, steps_per_function=21, merge="sum"))


def test_group_settings_come_from_the_plan_local_ones_from_this_node(tmp_path: Path) -> None:
    local = Settings(steps_per_function=999, sync_every=99, threads=3, nice=5, checkpoint_secs=12.0, merge="average")
    launcher = JobLauncher(tmp_path, sys.executable, {}, lambda: local)
    s = launcher.settings(plan(1))
    assert (s.steps_per_function, s.sync_every, s.merge) == (21, 7, "sum")
    assert (s.threads, s.nice, s.checkpoint_secs) == (3, 5, 12.0)


def test_job_dir_is_per_group_and_index(tmp_path: Path) -> None:
    launcher = JobLauncher(tmp_path / "jobs", sys.executable, {}, Settings)
    d = launcher.job_dir(plan(1))
    assert d == tmp_path / "jobs" / "abc-1" and d.is_dir()
    assert launcher.job_dir(plan(0)) == tmp_path / "jobs" / "abc-0"


def test_a_jobs_disk_room_is_what_the_cap_leaves_and_too_little_is_refused(tmp_path: Path) -> None:
    """The job's directory may hold the node's disk cap less the cache and the other jobs; a
    cap that leaves less than a job needs is refused before anything starts, naming the
    setting."""
    import pytest

    from crowdd.node.launcher import MIN_JOB_DISK, LaunchError

    cache, jobs = tmp_path / "cache", tmp_path / "jobs"
    cache.mkdir()
    (cache / ("a" * 64 + ".data")).write_bytes(b"\0" * 1000)
    launcher = JobLauncher(jobs, sys.executable, {}, Settings, dataset_cache=cache)
    other = launcher.job_dir(plan(0))
    (other / "ckpt").write_bytes(b"\0" * 500)
    mine = launcher.job_dir(plan(1))
    (mine / "old").write_bytes(b"\0" * 300)  # its own files count toward its room, not against it
    cap = MIN_JOB_DISK + 2000
    assert launcher._disk_room(mine, cap) == cap - 1500
    assert launcher._disk_room(mine, 0) == 0  # no cap
    with pytest.raises(LaunchError) as info:
        launcher._disk_room(mine, MIN_JOB_DISK)
    assert "[limits] disk_max_gb" in info.value.message

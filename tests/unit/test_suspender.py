"""JobSuspender (crowdd.testing.suspender) on real process trees."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from crowdd.platform.process import group_options, kill_group
from crowdd.testing.suspender import JobSuspender


# --- JobSuspender on real processes


@pytest.fixture
def job_tree() -> Iterator[subprocess.Popen[bytes]]:
    code = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(0.05)'])\n"
        "print(c.pid, flush=True)\n"
        "while True: time.sleep(0.05)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, **group_options())
    try:
        yield proc
    finally:
        kill_group(proc, grace=0)
        if proc.stdout:
            proc.stdout.close()


def _wait_status(pid: int, want_stopped: bool) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stopped = psutil.Process(pid).status() == psutil.STATUS_STOPPED
        if stopped == want_stopped:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX job-control states")
def test_job_suspender_real_tree(job_tree: subprocess.Popen[bytes]) -> None:
    assert job_tree.stdout is not None
    grandchild = int(job_tree.stdout.readline())
    s = JobSuspender(job_tree.pid)
    assert not s.suspended
    stopped = s.suspend()
    assert set(stopped) == {job_tree.pid, grandchild} and s.suspended
    assert _wait_status(job_tree.pid, True) and _wait_status(grandchild, True)
    assert s.suspend() == stopped  # idempotent
    assert set(s.resume()) == {job_tree.pid, grandchild} and not s.suspended
    assert _wait_status(job_tree.pid, False) and _wait_status(grandchild, False)


def test_job_suspender_gone_process() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=30)
    with pytest.raises(ProcessLookupError, match=f"no process {p.pid}"):
        JobSuspender(p.pid).suspend()
    assert JobSuspender(p.pid).resume() == []

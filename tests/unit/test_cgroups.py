"""A job's cgroup, for real on this machine (root on Linux: CI's; the suite needs it there): the
kernel holds a burst of memory that a poll between two looks would miss, refuses forks past the
task cap, and a process that left the job's session is still killed; the honest job under its
caps runs. The v1 and v2 layouts are read from real ``/proc`` text and from written examples."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crowdd.platform.cgroups import CgroupUnavailable, JobCgroup, JobCgroups, parse_mountinfo, parse_proc_cgroup
from crowdd.platform.process import group_options


def cgroups_or_skip() -> JobCgroups:
    try:
        return JobCgroups.find()
    except CgroupUnavailable as exc:
        pytest.skip(f"no cgroup for jobs on this machine: {exc}")


@pytest.fixture
def job_cgroup(request: pytest.FixtureRequest) -> Iterator[JobCgroup]:
    marker = request.node.get_closest_marker("caps")
    memory_mb, pids_max = marker.args if marker else (100, 4096)
    cg = cgroups_or_skip().create(f"test-{os.getpid()}-{request.node.name[:40]}", memory_mb, pids_max)
    try:
        yield cg
    finally:
        cg.kill()
        assert cg.remove(), "the test's cgroup could not be removed"
    assert not any(d.exists() for d in cg.dirs), "a cgroup was left behind"


def run_in(cg: JobCgroup | None, code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    opts = group_options(cgroup_procs=cg.procs_files) if cg is not None else group_options()
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, check=False, **opts)


BURST = """
    import time
    b = bytearray(300 * 2**20)  # a burst over the cap, gone before a 1 s poll looks
    del b
    print("survived", flush=True)
    """


def test_a_burst_over_the_memory_cap_is_stopped_by_the_kernel(job_cgroup: JobCgroup) -> None:
    done = run_in(job_cgroup, BURST)
    assert done.returncode == -9 and "survived" not in done.stdout, (done.returncode, done.stdout, done.stderr)
    assert job_cgroup.oom_kills() >= 1
    # the control: the same burst without the cgroup runs through (what a poll would have missed)
    control = run_in(None, BURST)
    assert control.returncode == 0 and "survived" in control.stdout


def test_a_job_under_its_memory_cap_runs(job_cgroup: JobCgroup) -> None:
    done = run_in(job_cgroup, "b = bytearray(20 * 2**20)\nprint('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert job_cgroup.oom_kills() == 0 and 0 < job_cgroup.peak_mb() <= 100


FORKS = """
    import os, time
    made = 0
    for _ in range(60):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            os.close(1), os.close(2)  # the parent's output ends when it does
            time.sleep(30)
            os._exit(0)
        made += 1
    print(made, flush=True)
    """


@pytest.mark.caps(100, 20)
def test_forks_past_the_task_cap_are_refused(job_cgroup: JobCgroup) -> None:
    done = run_in(job_cgroup, FORKS, timeout=60)
    made = int(done.stdout.split()[0])
    assert made < 20, made  # the process itself counts too
    assert made >= 10, f"the honest forks under the cap were refused too: {made}"
    job_cgroup.kill()
    assert not job_cgroup.pids()


def test_a_process_that_left_the_session_is_still_killed(job_cgroup: JobCgroup) -> None:
    escape = """
        import os, sys, time
        if os.fork() == 0:
            os.setsid()  # out of the job's session and process group
            if os.fork() == 0:
                print(os.getpid(), flush=True)
                time.sleep(60)
            os._exit(0)
        time.sleep(60)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(escape)], stdout=subprocess.PIPE, text=True,
                            **group_options(cgroup_procs=job_cgroup.procs_files))
    assert proc.stdout is not None
    escaped = int(proc.stdout.readline())
    assert os.getpgid(escaped) != proc.pid and escaped in job_cgroup.pids()
    job_cgroup.kill()
    assert proc.wait(10) == -9
    deadline = time.monotonic() + 5
    while Path(f"/proc/{escaped}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    status = Path(f"/proc/{escaped}/status")
    assert not status.exists() or "zombie" in status.read_text(), "the escaped process outlived the job"


def test_a_stale_cgroup_of_a_dead_daemon_is_swept(tmp_path: Path) -> None:
    cgroups = cgroups_or_skip()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    stale = [b / f"crowdd-job-{dead}-old" for b in cgroups.bases]
    live = cgroups.create("mine", 0)
    for d in stale:
        d.mkdir()
    try:
        removed = cgroups.sweep()
        assert set(stale) <= set(removed) and not any(d.exists() for d in stale)
        assert all(d.exists() for d in live.dirs), "this daemon's own job cgroup was swept"
    finally:
        for d in stale:
            if d.exists():
                d.rmdir()
        live.remove()


def test_this_processes_cgroups_parse() -> None:
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    own = parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
    assert mounts and own
    assert all(m.fstype in ("cgroup", "cgroup2") for m in mounts)


def test_written_layouts_parse() -> None:
    v2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    hybrid = ("41 30 0:35 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
              "42 30 0:36 /lxc /sys/fs/cgroup/my\\040pids rw shared:9 - cgroup cgroup rw,pids\n"
              "43 30 0:37 / /proc rw - proc proc rw\n")
    (m,) = parse_mountinfo(v2)
    assert (m.point, m.root, m.fstype) == (Path("/sys/fs/cgroup"), "/", "cgroup2")
    mem, pids = parse_mountinfo(hybrid)
    assert "memory" in mem.options and pids.point == Path("/sys/fs/cgroup/my pids") and pids.root == "/lxc"
    assert parse_proc_cgroup("0::/system.slice/crowdd.service\n") == {"": "/system.slice/crowdd.service"}
    assert parse_proc_cgroup("4:memory:/a\n8:cpu,cpuacct:/b\n0::/\n") == {"memory": "/a", "cpu": "/b", "cpuacct": "/b",
                                                                         "": "/"}


def test_no_writable_hierarchy_says_why(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text("43 30 0:37 / /proc rw - proc proc rw\n")
    (proc / "cgroup").write_text("0::/\n")
    with pytest.raises(CgroupUnavailable) as info:
        JobCgroups.find(proc=proc)
    assert "no cgroup v1 memory hierarchy" in str(info.value)

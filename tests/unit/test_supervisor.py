"""The job supervisor: events, the whole process group killed, suspend/resume, no orphans."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from crowdd.platform.cgroups import CgroupUnavailable, JobCgroups
from crowdd.platform.process import SAFE_PATH, group_options, kill_group, signal_group
from crowdd.node.supervisor import JobError, JobSupervisor, job_command

pytestmark = pytest.mark.timeout(60)

# A stand-in for the job: prints events, starts a grandchild in its group (like a TF server).
FAKE_JOB = textwrap.dedent(
    """
    import json, signal, subprocess, sys, time
    ignore = "--ignore-term" in sys.argv
    if ignore:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    print(json.dumps({"event": "started", "pid": child.pid}), flush=True)
    print("a plain log line, not an event", flush=True)
    print(json.dumps([1, 2]), flush=True)
    print(json.dumps({"event": "progress", "step": 1}), flush=True)
    if "--exit" in sys.argv:
        print(json.dumps({"event": "error", "message": "boom"}), flush=True)
        sys.exit(3)
    time.sleep(600)
    """
)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        await asyncio.sleep(0.05)
    return gone(pid)


@pytest.fixture
def fake_job(tmp_path: Path) -> Path:
    p = tmp_path / "fake_job.py"
    p.write_text(FAKE_JOB)
    return p


async def started(sup: JobSupervisor, events: list[dict[str, Any]]) -> int:
    for _ in range(200):
        if any(e["event"] == "progress" for e in events):
            break
        await asyncio.sleep(0.05)
    return int(next(e for e in events if e["event"] == "started")["pid"])


async def test_events_and_stop_kills_the_whole_group(fake_job: Path, tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    sup = JobSupervisor([sys.executable, str(fake_job), "--ignore-term"], on_event=events.append,
                        cwd=tmp_path, log_path=tmp_path / "job.log", nice=19)
    await sup.start()
    try:
        grandchild = await started(sup, events)
        assert [e["event"] for e in events] == ["started", "progress"]  # non-events skipped
        job = psutil.Process(sup.pid)
        assert job.nice() == 19
        assert os.getpgid(sup.pid) == sup.pid  # its own process group ...
        assert os.getsid(sup.pid) == sup.pid  # ... and session
        assert os.getpgid(grandchild) == sup.pid
        assert sup.running
    finally:
        code = await sup.stop(grace=0.5)  # both ignore SIGTERM: SIGKILL after the grace
    assert code is not None and not sup.running
    assert await wait_gone(grandchild)


async def test_wait_returns_exit_code_and_reaps_stragglers(fake_job: Path) -> None:
    events: list[dict[str, Any]] = []
    sup = JobSupervisor([sys.executable, str(fake_job), "--exit"], on_event=events.append)
    await sup.start()
    code = await asyncio.wait_for(sup.wait(), 30)
    assert code == 3
    assert sup.last_error == "boom"
    grandchild = int(events[0]["pid"])
    assert await wait_gone(grandchild)  # the TF-server stand-in did not outlive the job


async def test_suspend_and_resume(fake_job: Path) -> None:
    events: list[dict[str, Any]] = []
    sup = JobSupervisor([sys.executable, str(fake_job)], on_event=events.append)
    await sup.start()
    try:
        grandchild = await started(sup, events)
        sup.suspend()
        assert sup.suspended
        for _ in range(250):  # signal delivery is asynchronous (and slow on a loaded machine)
            if all(psutil.Process(p).status() == psutil.STATUS_STOPPED for p in (sup.pid, grandchild)):
                break
            await asyncio.sleep(0.02)
        assert psutil.Process(sup.pid).status() == psutil.STATUS_STOPPED
        assert psutil.Process(grandchild).status() == psutil.STATUS_STOPPED
        sup.resume()
        assert not sup.suspended
        for _ in range(250):
            if psutil.Process(sup.pid).status() != psutil.STATUS_STOPPED:
                break
            await asyncio.sleep(0.02)
        assert psutil.Process(sup.pid).status() != psutil.STATUS_STOPPED
        sup.suspend()  # a stopped job must still die on stop()
    finally:
        await sup.stop(grace=2.0)
    assert await wait_gone(grandchild)


def wait_gone_sync(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not gone(pid):
        time.sleep(0.05)
    return gone(pid)


def test_job_dies_with_a_killed_daemon(fake_job: Path, tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: even a SIGKILLed daemon leaves no job behind."""
    script = tmp_path / "daemon.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, json, sys
        from crowdd.node.supervisor import JobSupervisor
        async def main():
            sup = JobSupervisor([sys.executable, {str(fake_job)!r}], on_event=lambda e: print(json.dumps(e), flush=True))
            await sup.start()
            print(json.dumps({{"event": "job", "pid": sup.pid}}), flush=True)
            await asyncio.sleep(600)
        asyncio.run(main())
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, **group_options())
    try:
        assert proc.stdout is not None
        job_pid = grandchild = 0
        while not (job_pid and grandchild):
            line = proc.stdout.readline()
            assert line, "the fake daemon exited early"
            ev = json.loads(line)
            if ev["event"] == "job":
                job_pid = ev["pid"]
            elif ev["event"] == "started":
                grandchild = ev["pid"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_gone_sync(job_pid)
    finally:
        if proc.poll() is None:
            kill_group(proc, grace=0)
        if job_pid and not gone(job_pid):
            signal_group(job_pid, signal.SIGKILL)
    # the job's own child is in the job's group; the job (the real one) watches its parent.
    # Here the stand-in does not, so clean it up: that is the job's contract, not ours.
    if grandchild and not gone(grandchild):
        os.kill(grandchild, signal.SIGKILL)


async def test_missing_program_is_a_clear_error(tmp_path: Path) -> None:
    sup = JobSupervisor([str(tmp_path / "no-such-python")], on_event=lambda e: None)
    with pytest.raises(JobError, match="cannot start the job"):
        await sup.start()
    assert await sup.stop() is None


def test_job_command() -> None:
    assert job_command("worker", Path("/s.json"), "/py") == ["/py", SAFE_PATH, "-m", "crowdd.job", "worker", "--spec", "/s.json"]


def test_a_module_planted_in_the_work_directory_never_runs(tmp_path: Path) -> None:
    """A group member's graph can write into the job's work directory, where the job starts.
    A module planted there (``argparse.py``, ``keras.py``, ...) must not be imported by the
    next job process; the control shows the same plant runs when that directory is on sys.path."""
    marker = tmp_path / "planted-ran"
    for name in ("argparse", "logging", "keras", "tensorflow", "numpy"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\nraise SystemExit(99)\n")
    argv = job_command("worker", tmp_path / "no-spec.json", sys.executable)
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, timeout=60)
    assert not marker.exists(), marker.read_text()
    assert done.returncode != 99 and b"no-spec.json" in done.stdout + done.stderr  # it ran and refused the spec
    unsafe = [a for a in argv if a != SAFE_PATH]
    assert subprocess.run(unsafe, cwd=tmp_path, capture_output=True, timeout=60).returncode == 99
    assert marker.exists()  # the attack is real without it


# A job whose TF-server-like child grows: each holds `mb` MB, touched (resident), then sleeps.
HUNGRY_JOB = textwrap.dedent(
    """
    import json, subprocess, sys, time
    mb = int(sys.argv[1])
    grow = "import os, sys, time\\nif 'setsid' in sys.argv: os.setsid()\\nb = bytearray(%d << 20); time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", grow % mb, *(["setsid"] if "--setsid" in sys.argv else [])])
    print(json.dumps({"event": "started", "pid": child.pid}), flush=True)
    hold = bytearray(mb << 20)
    print(json.dumps({"event": "progress", "step": 1}), flush=True)
    time.sleep(600 if "--stay" in sys.argv else 3)
    """
)


async def test_a_job_over_its_memory_cap_is_stopped_with_a_clear_error(tmp_path: Path) -> None:
    """The cap counts the job and its children together (2 × 150 MB > 200 MB): the whole group
    is killed, the error says what it used and which setting capped it; nothing is left."""
    script = tmp_path / "hungry.py"
    script.write_text(HUNGRY_JOB)
    events: list[dict[str, Any]] = []
    sup = JobSupervisor([sys.executable, str(script), "150", "--stay"], on_event=events.append, max_memory_mb=200)
    await sup.start()
    code = await asyncio.wait_for(sup.wait(), 30)
    child = int(next(e for e in events if e["event"] == "started")["pid"])
    assert code == -signal.SIGKILL
    assert sup.memory_exceeded and sup.last_error is not None
    assert "over this node's cap of 200 MB ([job] max_memory_mb)" in sup.last_error, sup.last_error
    used = int(sup.last_error.split("used ")[1].split(" MB")[0])
    assert 200 < used < 600, sup.last_error
    assert events[-1] == {"event": "error", "message": sup.last_error}
    assert await wait_gone(child)


async def test_a_child_that_leaves_the_group_is_still_capped_suspended_and_stopped(tmp_path: Path) -> None:
    """A graph's process calls ``setsid()`` to leave the job's process group: its memory still
    counts against the cap (2 x 150 MB > 200 MB: killed, with the error), and a suspend or stop
    reaches it. The control: under the cap with the same escape, it runs to its end."""
    script = tmp_path / "hungry.py"
    script.write_text(HUNGRY_JOB)
    events: list[dict[str, Any]] = []
    sup = JobSupervisor([sys.executable, str(script), "150", "--stay", "--setsid"], on_event=events.append,
                        max_memory_mb=200)
    await sup.start()
    code = await asyncio.wait_for(sup.wait(), 30)
    child = int(next(e for e in events if e["event"] == "started")["pid"])
    assert code == -signal.SIGKILL and sup.memory_exceeded, (code, sup.last_error)
    assert await wait_gone(child)

    events.clear()
    sup = JobSupervisor([sys.executable, str(script), "20", "--stay", "--setsid"], on_event=events.append,
                        max_memory_mb=400)
    await sup.start()
    while not any(e["event"] == "progress" for e in events):
        await asyncio.sleep(0.05)
    child = int(next(e for e in events if e["event"] == "started")["pid"])
    for _ in range(100):  # it leaves the group as it starts
        if os.getpgid(child) != sup.pid:
            break
        await asyncio.sleep(0.05)
    assert os.getpgid(child) != sup.pid
    sup.suspend()
    await asyncio.sleep(0.3)
    assert psutil.Process(child).status() == psutil.STATUS_STOPPED
    sup.resume()
    await sup.stop(grace=1.0)
    assert await wait_gone(child)
    assert not sup.memory_exceeded


async def test_a_job_in_its_cgroup_over_the_cap_is_stopped_by_the_kernel_and_leaves_nothing(tmp_path: Path) -> None:
    """With a cgroup of its own, the cap is the kernel's: a child that left the group (setsid)
    and grows past it is killed at once, the rest of the job with it, the error says which
    setting capped it, and the cgroup is gone afterwards. The control: the same job under a
    higher cap runs."""
    try:
        cgroups = JobCgroups.find()
    except CgroupUnavailable as exc:
        pytest.skip(f"no cgroup for jobs here: {exc}")
    script = tmp_path / "hungry.py"
    script.write_text(HUNGRY_JOB)
    events: list[dict[str, Any]] = []
    cg = cgroups.create("hungry", 200)
    sup = JobSupervisor([sys.executable, str(script), "150", "--stay", "--setsid"], on_event=events.append,
                        max_memory_mb=200, cgroup=cg)
    await sup.start()
    code = await asyncio.wait_for(sup.wait(), 30)
    child = int(next(e for e in events if e["event"] == "started")["pid"])
    assert code == -signal.SIGKILL and sup.memory_exceeded, (code, sup.last_error)
    assert "over this node's cap of 200 MB ([job] max_memory_mb)" in (sup.last_error or ""), sup.last_error
    assert events[-1] == {"event": "error", "message": sup.last_error}
    assert await wait_gone(child)
    assert not any(d.exists() for d in cg.dirs), "the job's cgroup was left behind"

    events.clear()
    cg = cgroups.create("fed", 600)
    sup = JobSupervisor([sys.executable, str(script), "150", "--setsid"], on_event=events.append,
                        max_memory_mb=600, cgroup=cg)
    await sup.start()
    assert await asyncio.wait_for(sup.wait(), 30) == 0 and not sup.memory_exceeded, sup.last_error
    assert not any(d.exists() for d in cg.dirs)


# A job that writes `count` files of `mb` MB into its directory, then says how the writes went.
WRITER_JOB = textwrap.dedent(
    """
    import json, sys, time
    mb, count = int(sys.argv[1]), int(sys.argv[2])
    written = []
    for i in range(count):
        try:
            with open(f"out-{i}.bin", "wb") as fh:
                fh.write(b"x" * (mb << 20))
            written.append(i)
        except OSError as exc:
            print(json.dumps({"event": "log", "message": f"write {i}: {exc.strerror}"}), flush=True)
    print(json.dumps({"event": "progress", "written": written}), flush=True)
    time.sleep(600 if "--stay" in sys.argv else 0.1)
    """
)


async def test_a_job_filling_its_directory_is_stopped_at_the_disk_cap(tmp_path: Path) -> None:
    """No one file grows past the job's room (the write fails, EFBIG), and many files past it
    end the job with an error naming the setting. The control: under the room, it runs."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER_JOB)
    workdir = tmp_path / "job"
    workdir.mkdir()
    events: list[dict[str, Any]] = []
    big = JobSupervisor([sys.executable, str(script), "30", "1"], on_event=events.append, cwd=workdir,
                        max_disk_bytes=20 << 20)
    await big.start()
    await asyncio.wait_for(big.wait(), 30)
    assert any("write 0: File too large" in str(e.get("message")) for e in events), events
    assert (workdir / "out-0.bin").stat().st_size <= 20 << 20

    events.clear()
    many = JobSupervisor([sys.executable, str(script), "8", "6", "--stay"], on_event=events.append, cwd=workdir,
                         max_disk_bytes=30 << 20)
    await many.start()
    code = await asyncio.wait_for(many.wait(), 30)
    assert code == -signal.SIGKILL and many.disk_exceeded and not many.memory_exceeded, (code, many.last_error)
    assert "this node's disk cap leaves it ([limits] disk_max_gb)" in (many.last_error or ""), many.last_error
    assert events[-1] == {"event": "error", "message": many.last_error}

    for f in workdir.iterdir():
        f.unlink()
    events.clear()
    fits = JobSupervisor([sys.executable, str(script), "4", "3"], on_event=events.append, cwd=workdir,
                         max_disk_bytes=30 << 20)
    await fits.start()
    assert await asyncio.wait_for(fits.wait(), 30) == 0 and not fits.disk_exceeded, fits.last_error
    assert events[-1] == {"event": "progress", "written": [0, 1, 2]}


async def test_a_job_under_its_memory_cap_runs_to_its_end(tmp_path: Path) -> None:
    script = tmp_path / "hungry.py"
    script.write_text(HUNGRY_JOB)
    events: list[dict[str, Any]] = []
    sup = JobSupervisor([sys.executable, str(script), "30"], on_event=events.append, max_memory_mb=400)
    await sup.start()
    assert await asyncio.wait_for(sup.wait(), 30) == 0
    assert not sup.memory_exceeded and sup.last_error is None

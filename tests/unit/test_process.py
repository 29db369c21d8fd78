"""Process control on real processes: groups killed, suspended and resumed; children that die
with their parent; priority set before exec."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from crowdd.platform.process import (
    group_options,
    kill_group,
    resume_group,
    signal_group,
    suspend_group,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups and job-control states"),
]

ROOT = Path(__file__).resolve().parents[2]
SLEEPER = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)"
SPINNER = "while True: pass"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(pred: object, timeout: float = 10.0) -> bool:
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def force_kill(*pids: int) -> None:
    for pid in pids:
        if pid and not gone(pid):
            os.kill(pid, signal.SIGKILL)


def spawn_parent(tmp_path: Path, child_options: str) -> tuple[subprocess.Popen[str], int]:
    """A parent process that starts one sleeping child with ``group_options(<child_options>)``
    and prints the child's pid; returns (parent, child pid)."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import signal, subprocess, sys, time
        from crowdd.platform.process import group_options
        child = subprocess.Popen([sys.executable, "-c", {SLEEPER!r}], **group_options({child_options}))
        print(child.pid, flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              **group_options())
    assert parent.stdout is not None
    line = parent.stdout.readline()
    assert line, "the parent exited early"
    return parent, int(line)


@pytest.fixture
def group() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A group leader that ignores SIGTERM and a grandchild in its group that ignores it too."""
    code = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        c = subprocess.Popen([sys.executable, "-c", {SLEEPER!r}])
        print(c.pid, flush=True)
        time.sleep(600)
    """)
    leader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, **group_options())
    assert leader.stdout is not None
    grandchild = int(leader.stdout.readline())
    try:
        yield leader, grandchild
    finally:
        if leader.poll() is None:
            signal_group(leader.pid, signal.SIGKILL)
            leader.wait(timeout=10)
        force_kill(grandchild)
        leader.stdout.close()


def test_new_group_and_session() -> None:
    p = subprocess.Popen([sys.executable, "-c", SLEEPER], **group_options())
    try:
        assert os.getpgid(p.pid) == p.pid
        assert os.getsid(p.pid) == p.pid
    finally:
        assert kill_group(p, grace=0) is not None


def test_kill_group_kills_the_whole_group_after_the_grace(group: tuple[subprocess.Popen[str], int]) -> None:
    leader, grandchild = group
    assert os.getpgid(grandchild) == leader.pid
    t0 = time.monotonic()
    code = kill_group(leader, grace=0.5)  # both ignore SIGTERM: SIGKILL after the grace
    assert time.monotonic() - t0 >= 0.5
    assert code == -signal.SIGKILL
    assert wait_until(lambda: gone(grandchild))


def test_kill_group_is_quick_when_the_leader_obeys_sigterm() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(600)"], **group_options())
    time.sleep(0.2)  # let the interpreter start (a SIGTERM before that is fine too)
    t0 = time.monotonic()
    assert kill_group(p, grace=30) == -signal.SIGTERM
    assert time.monotonic() - t0 < 20


def test_kill_group_wakes_a_suspended_group() -> None:
    """A stopped process cannot run its SIGTERM handler: kill_group continues the group."""
    code = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(3))\nprint(flush=True)\ntime.sleep(600)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, **group_options())
    assert p.stdout is not None
    p.stdout.readline()  # the handler is in place
    assert suspend_group(p.pid)
    assert wait_until(lambda: psutil.Process(p.pid).status() == psutil.STATUS_STOPPED)
    t0 = time.monotonic()
    assert kill_group(p, grace=30) == 3  # the handler ran: SIGCONT came with SIGTERM
    assert time.monotonic() - t0 < 20
    p.stdout.close()


def test_signal_group_of_a_gone_process() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"], **group_options())
    p.wait(timeout=30)
    assert not signal_group(p.pid, signal.SIGTERM)
    assert not suspend_group(p.pid) and not resume_group(p.pid)
    assert kill_group(p) == 0


def test_suspend_stops_cpu_progress_of_the_group() -> None:
    code = textwrap.dedent(f"""
        import subprocess, sys
        c = subprocess.Popen([sys.executable, "-c", {SPINNER!r}])
        print(c.pid, flush=True)
        while True: pass
    """)
    leader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, **group_options())
    assert leader.stdout is not None
    grandchild = int(leader.stdout.readline())
    procs = [psutil.Process(leader.pid), psutil.Process(grandchild)]

    def cpu() -> list[float]:
        return [sum(p.cpu_times()[:2]) for p in procs]

    try:
        assert suspend_group(leader.pid)
        assert wait_until(lambda: all(p.status() == psutil.STATUS_STOPPED for p in procs))
        before = cpu()
        time.sleep(0.5)
        assert cpu() == before  # stopped: not one tick more
        assert resume_group(leader.pid)
        assert wait_until(lambda: all(now > then for now, then in zip(cpu(), before)))
    finally:
        kill_group(leader, grace=0)
        force_kill(grandchild)
        leader.stdout.close()


def test_child_dies_with_its_killed_parent(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: the child is in a session of its own, yet a SIGKILLed parent takes it along."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    parent, child = spawn_parent(tmp_path, "death_signal=signal.SIGKILL")
    try:
        assert os.getsid(child) == child != os.getsid(parent.pid)
        parent.kill()
        parent.wait(timeout=10)
        assert wait_until(lambda: gone(child))
    finally:
        kill_group(parent, grace=0)
        force_kill(child)
        assert parent.stdout is not None
        parent.stdout.close()


def test_without_death_signal_the_child_outlives_its_parent(tmp_path: Path) -> None:
    """The control for the test above: the death signal is what ends the child."""
    parent, child = spawn_parent(tmp_path, "")
    try:
        parent.kill()
        parent.wait(timeout=10)
        time.sleep(0.5)
        assert not gone(child)
    finally:
        force_kill(child)
        kill_group(parent, grace=0)
        assert parent.stdout is not None
        parent.stdout.close()


def test_exit_with_parent(tmp_path: Path) -> None:
    """A process that calls exit_with_parent leaves once its parent is gone (here by SIGKILL)."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import subprocess, sys, time
        from crowdd.platform.process import group_options
        code = "import os, time\\nfrom crowdd.platform.process import exit_with_parent\\n"
        code += "exit_with_parent(int(os.environ['PARENT']))\\ntime.sleep(600)"
        import os
        env = dict(os.environ, PARENT=str(os.getpid()))
        child = subprocess.Popen([sys.executable, "-c", code], env=env, **group_options())
        print(child.pid, flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              **group_options())
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        time.sleep(1.0)  # the child has imported crowdd and armed its watch
        assert not gone(child)
        parent.kill()
        parent.wait(timeout=10)
        assert wait_until(lambda: gone(child))
    finally:
        force_kill(child)
        kill_group(parent, grace=0)
        parent.stdout.close()


def test_priority_set_before_exec() -> None:
    p = subprocess.Popen([sys.executable, "-c", SLEEPER], **group_options(nice=19))
    try:
        assert psutil.Process(p.pid).nice() == 19
        if hasattr(os, "sched_getscheduler") and hasattr(os, "SCHED_IDLE"):
            assert os.sched_getscheduler(p.pid) == os.SCHED_IDLE
    finally:
        kill_group(p, grace=0)


def test_priority_below_idle_keeps_the_normal_scheduler() -> None:
    if os.getpriority(os.PRIO_PROCESS, 0) > 10:
        pytest.skip("this test runs at a lower priority than the one it asks for")
    p = subprocess.Popen([sys.executable, "-c", SLEEPER], **group_options(nice=10))
    try:
        assert psutil.Process(p.pid).nice() == 10
        if hasattr(os, "sched_getscheduler") and hasattr(os, "SCHED_IDLE"):
            assert os.sched_getscheduler(p.pid) == os.sched_getscheduler(0)
    finally:
        kill_group(p, grace=0)


# A process of the job's user without capabilities (as a graph's TF server runs) opens a
# sibling's /proc files: ``environ`` and ``fd/1`` (the job's event pipe).
_SIBLING = textwrap.dedent("""
    import json, os, sys, time
    from crowdd.platform.process import undumpable
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        if sys.argv[1] == "undumpable":
            undumpable()
        os.write(w, b"x")
        time.sleep(30)
        os._exit(0)
    os.read(r, 1)
    out = {}
    for name, mode in (("environ", "rb"), ("fd/1", "wb")):
        try:
            with open(f"/proc/{pid}/{name}", mode):
                out[name] = "ok"
        except OSError as exc:
            out[name] = exc.strerror
    os.kill(pid, 9)
    print(json.dumps(out))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_DUMPABLE is Linux only")
@pytest.mark.parametrize("kind", ["dumpable", "undumpable"])
def test_an_undumpable_process_s_proc_files_stay_closed_to_its_siblings(kind: str) -> None:
    import json

    # as a confined job: the mapped root of a user namespace, every capability dropped
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--", "setpriv", "--bounding-set=-all",
                           "--inh-caps=-all", "--no-new-privs", sys.executable, "-c", _SIBLING, kind],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    if kind == "dumpable":  # the control: without it a sibling opens both
        assert got == {"environ": "ok", "fd/1": "ok"}, got
    else:
        assert got == {"environ": "Permission denied", "fd/1": "Permission denied"}, got

"""The idle probes: other processes' CPU (crowdd's own tree excluded), logind via loginctl."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import psutil
import pytest

from crowdd.config import IdleConfig
from crowdd.idle.policy import IdlePolicy, Verdict
from crowdd.idle.probes import (
    BatteryReading,
    CpuReading,
    LogindIdle,
    OtherCpu,
    UserIdle,
    parse_sessions,
    system_probes,
    user_idle_from_sessions,
)
from crowdd.platform.process import group_options, kill_group


# --- other processes' CPU


def test_other_cpu_excludes_own_tree() -> None:
    busy = [100.0]
    tree = [{1: 5.0, 2: 1.0}]
    meter = OtherCpu(1, busy=lambda: busy[0], tree=lambda root: tree[0], ncpu=2, clock=lambda: 0.0)
    assert meter().other_seconds == 0.0
    busy[0] = 120.0  # 20 cpu-s used in all ...
    tree[0] = {1: 6.0, 3: 4.0}  # ... 1 by the daemon, 4 by a new child (pid 2 exited)
    assert meter().other_seconds == pytest.approx(15.0)


def test_other_cpu_real_child_counts_as_own() -> None:
    """A real busy child of this process is crowdd's own tree: its CPU time is not "other"."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<60: pass"],
        **group_options(),
    )
    try:
        proc = psutil.Process(child.pid)

        def burned() -> float:
            t = proc.cpu_times()
            return t.user + t.system

        machine = iter([0.0, 1000.0])  # the machine's busy counter, under the test's control
        meter = OtherCpu(os.getpid(), busy=lambda: next(machine), ncpu=2)
        assert meter().other_seconds == 0.0
        start = burned()
        deadline = time.monotonic() + 30
        while burned() - start < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        used = burned() - start
        assert used >= 0.3
        second = meter()
        assert second.other_seconds <= 1000.0 - used  # the child's time was taken out
        assert real_reading_ok()
    finally:
        kill_group(child, grace=0)


def real_reading_ok() -> bool:
    reading = OtherCpu(os.getpid())()
    return reading.ncpu >= 1 and reading.other_seconds == 0.0


# --- logind


def _session(**kw: str) -> dict[str, str]:
    base = {"Id": "2", "Class": "user", "Type": "tty", "Active": "yes", "IdleHint": "no", "IdleSinceHint": "0"}
    return {**base, **kw}


def test_logind_sessions() -> None:
    now = 10_000.0
    busy = user_idle_from_sessions([_session(IdleHint="yes", IdleSinceHint="9000000000"), _session(Id="3")], now)
    assert busy.idle_seconds == 0.0 and "session 3 is in use" in busy.detail
    idle = user_idle_from_sessions(
        [_session(IdleHint="yes", IdleSinceHint="9000000000"), _session(Id="3", IdleHint="yes", IdleSinceHint="9400000000")],
        now,
    )
    assert idle.idle_seconds == pytest.approx(600.0)  # since the latest session went idle
    # greeters and inactive sessions do not count
    nobody = user_idle_from_sessions([_session(Class="greeter"), _session(Active="no")], now)
    assert nobody.idle_seconds == math.inf
    # a graphical session whose desktop never sets IdleHint: no signal
    silent = user_idle_from_sessions([_session(Type="wayland")], now)
    assert silent.idle_seconds is None and "never set IdleHint" in silent.detail
    mixed = user_idle_from_sessions([_session(Type="x11"), _session(Id="4", IdleHint="yes", IdleSinceHint="9990000000")], now)
    assert mixed.idle_seconds == pytest.approx(10.0) and "reports nothing" in mixed.detail


def test_parse_sessions_blocks() -> None:
    text = "Id=2\nClass=user\nIdleHint=no\n\nId=5\nClass=greeter\nIdleHint=yes\n"
    assert parse_sessions(text) == [
        {"Id": "2", "Class": "user", "IdleHint": "no"},
        {"Id": "5", "Class": "greeter", "IdleHint": "yes"},
    ]


def _runner(outputs: dict[str, subprocess.CompletedProcess[str] | BaseException]):  # type: ignore[no-untyped-def]
    calls: list[list[str]] = []

    def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        out = outputs[argv[1]]
        if isinstance(out, BaseException):
            raise out
        return out

    return run, calls


def _done(stdout: str = "", rc: int = 0, stderr: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess([], rc, stdout, stderr)


def test_logind_probe_via_loginctl() -> None:
    run, calls = _runner({
        "list-sessions": _done("    2 1000 alice seat0 tty2\n    7 1000 alice\n"),
        "show-session": _done("Id=2\nClass=user\nType=tty\nActive=yes\nIdleHint=yes\nIdleSinceHint=1000000000\n\n"
                              "Id=7\nClass=user\nType=tty\nActive=yes\nIdleHint=yes\nIdleSinceHint=2000000000\n"),
    })
    reading = LogindIdle(run=run, clock=lambda: 2300.0)()
    assert reading.idle_seconds == pytest.approx(300.0)
    assert calls[1][-2:] == ["2", "7"]


@pytest.mark.parametrize(
    ("outcome", "detail"),
    [
        (FileNotFoundError(), "loginctl not found"),
        (subprocess.TimeoutExpired(["loginctl"], 3), "timed out"),
        (_done(rc=1, stderr="System has not been booted with systemd as init system (PID 1). Can't operate.\n"),
         "logind unavailable: System has not been booted"),
    ],
)
def test_logind_probe_without_signal(outcome: subprocess.CompletedProcess[str] | BaseException, detail: str) -> None:
    run, _ = _runner({"list-sessions": outcome})
    reading = LogindIdle(run=run)()
    assert reading.idle_seconds is None and detail in reading.detail


def test_logind_no_sessions_means_nobody_there() -> None:
    run, _ = _runner({"list-sessions": _done("")})
    assert LogindIdle(run=run)().idle_seconds == math.inf


def test_system_probes_run_here() -> None:
    probes = system_probes()
    reading = probes.user_idle()
    assert isinstance(reading, UserIdle) and reading.detail
    assert isinstance(probes.cpu(), CpuReading)
    b = probes.battery()
    assert b is None or isinstance(b, BatteryReading)
    policy = IdlePolicy(IdleConfig(), probes)
    assert isinstance(policy.evaluate(), Verdict)

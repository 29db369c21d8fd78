"""The idle policy: each rule driven by injected probes, the schedule grammar, JobSuspender."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime

import psutil
import pytest

from crowdd.config import ConfigError, IdleConfig
from crowdd.idle import (
    AlwaysIdle,
    BatteryReading,
    CpuReading,
    IdlePolicy,
    JobSuspender,
    LogindIdle,
    OtherCpu,
    Probes,
    Schedule,
    ScheduleError,
    UserIdle,
    Verdict,
    parse_schedule,
    parse_sessions,
    system_probes,
    thread_env,
    user_idle_from_sessions,
)

# Wednesday 2026-11-25 12:00 local time
NOON_WED = datetime(2026, 11, 25, 12, 0).timestamp()


class Fake:
    """Mutable probe values plus a clock the test moves."""

    def __init__(self) -> None:
        self.now = NOON_WED
        self.user: UserIdle = UserIdle(3600.0, "logind")
        self.cpu_t = 0.0
        self.cpu_other = 0.0
        self.ncpu = 2
        self.battery: BatteryReading | None = None

    def clock(self) -> float:
        return self.now

    def cpu(self) -> CpuReading:
        return CpuReading(self.cpu_t, self.cpu_other, self.ncpu)

    def probes(self) -> Probes:
        return Probes(user_idle=lambda: self.user, cpu=self.cpu, battery=lambda: self.battery)

    def tick(self, seconds: float, other_cpu_seconds: float = 0.0) -> None:
        self.now += seconds
        self.cpu_t += seconds
        self.cpu_other += other_cpu_seconds


def make(fake: Fake, **cfg: object) -> IdlePolicy:
    return IdlePolicy(IdleConfig(**cfg), fake.probes(), clock=fake.clock)  # type: ignore[arg-type]


def warm(policy: IdlePolicy, fake: Fake) -> Verdict:
    """First evaluation only starts the CPU window; advance and evaluate again."""
    policy.evaluate()
    fake.tick(10)
    return policy.evaluate()


def test_all_rules_allow() -> None:
    fake = Fake()
    v = warm(make(fake), fake)
    assert v.allowed and v.rule is None
    assert "user idle 1h00m" in v.reason and "other CPU 0%" in v.reason
    assert v.to_dict() == {"allowed": True, "rule": None, "reason": v.reason, "on_busy": "suspend"}


def test_first_cpu_reading_is_only_a_start() -> None:
    fake = Fake()
    v = make(fake).evaluate()
    assert not v.allowed and v.rule == "cpu" and "measuring" in v.reason


# --- user idle


def test_user_active_holds() -> None:
    fake = Fake()
    fake.user = UserIdle(30.0, "logind")
    v = warm(make(fake, user_idle_minutes=5.0), fake)
    assert (v.allowed, v.rule) == (False, "user_idle")
    assert "idle 30s of the 5m00s required" in v.reason


def test_user_idle_long_enough_allows() -> None:
    fake = Fake()
    fake.user = UserIdle(301.0, "logind")
    assert warm(make(fake, user_idle_minutes=5.0), fake).allowed


def test_user_idle_rule_off() -> None:
    fake = Fake()
    fake.user = UserIdle(0.0, "logind")
    assert warm(make(fake, user_idle_minutes=0.0), fake).allowed


def test_no_user_signal_falls_back_to_cpu_and_says_so() -> None:
    fake = Fake()
    fake.user = UserIdle(None, "logind unavailable: Host is down")
    policy = make(fake, max_other_cpu_percent=30.0)
    v = warm(policy, fake)
    assert v.allowed
    assert "no user-idle signal (logind unavailable: Host is down)" in v.reason
    assert "CPU use decides" in v.reason
    # the CPU rule then holds, and the reason still says the user signal is missing
    fake.tick(10, other_cpu_seconds=16.0)  # 16 cpu-s in 10 s on 2 cpus = 80 %
    v = policy.evaluate()
    assert (v.allowed, v.rule) == (False, "cpu")
    assert "no user-idle signal" in v.reason


def test_no_user_signal_and_cpu_rule_off_says_so() -> None:
    fake = Fake()
    fake.user = UserIdle(None, "loginctl not found")
    v = make(fake, max_other_cpu_percent=100.0).evaluate()
    assert v.allowed and "CPU rule is off" in v.reason


# --- cpu


def test_cpu_busy_holds_and_window_recovers() -> None:
    fake = Fake()
    policy = make(fake, max_other_cpu_percent=30.0, cpu_window_seconds=60.0)
    policy.evaluate()
    fake.tick(30, other_cpu_seconds=30.0)  # 30 cpu-s / (30 s * 2) = 50 %
    v = policy.evaluate()
    assert (v.allowed, v.rule) == (False, "cpu") and "50% CPU (limit 30%)" in v.reason
    for _ in range(3):  # quiet for 90 s: the busy stretch leaves the 60 s window
        fake.tick(30)
        v = policy.evaluate()
    assert v.allowed, v.reason


def test_cpu_sampled_while_another_rule_holds() -> None:
    fake = Fake()
    policy = make(fake)
    policy.pause(1)
    policy.evaluate()
    fake.tick(10)
    policy.evaluate()
    policy.resume()
    assert policy.evaluate().allowed  # the window was already started


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
        start_new_session=True,
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
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=10)


def real_reading_ok() -> bool:
    reading = OtherCpu(os.getpid())()
    return reading.ncpu >= 1 and reading.other_seconds == 0.0


# --- battery


def test_battery_hysteresis() -> None:
    fake = Fake()
    policy = make(fake, battery_resume_percent=90.0)
    fake.battery = BatteryReading(50.0, True)
    assert warm(policy, fake).allowed  # on mains from the start: no threshold applies
    fake.battery = BatteryReading(50.0, False)
    v = policy.evaluate()
    assert (v.allowed, v.rule) == (False, "battery") and "on battery (50%)" in v.reason
    fake.battery = BatteryReading(60.0, True)
    v = policy.evaluate()
    assert (v.allowed, v.rule) == (False, "battery") and "resumes at 90%" in v.reason
    fake.battery = BatteryReading(89.0, None)  # unknown source: keep holding
    assert policy.evaluate().rule == "battery"
    fake.battery = BatteryReading(90.0, True)
    assert policy.evaluate().allowed
    fake.battery = BatteryReading(85.0, True)  # dips while plugged: no flapping
    assert policy.evaluate().allowed
    fake.battery = BatteryReading(85.0, None)
    assert policy.evaluate().allowed


def test_battery_allowed_or_absent() -> None:
    fake = Fake()
    fake.battery = BatteryReading(20.0, False)
    assert warm(make(fake, allow_on_battery=True), fake).allowed
    fake.battery = None
    assert warm(make(fake), fake).allowed


# --- schedule


def test_schedule_window_wraps_midnight() -> None:
    s = Schedule(["mon-fri 18:00-08:00", "sat,sun 00:00-24:00"])
    assert not s.contains(datetime(2026, 11, 25, 12, 0))  # Wed noon
    assert s.contains(datetime(2026, 11, 25, 18, 0))  # Wed 18:00
    assert s.contains(datetime(2026, 11, 26, 7, 59))  # Thu early (Wed's window)
    assert not s.contains(datetime(2026, 11, 26, 8, 0))
    assert not s.contains(datetime(2026, 11, 23, 3, 0))  # Mon 03:00: Sunday's day ended at 24:00
    assert s.contains(datetime(2026, 11, 28, 3, 0))  # Sat (Fri's window and Sat's day)
    assert s.contains(datetime(2026, 11, 29, 23, 59))  # Sun late
    assert s.next_start(datetime(2026, 11, 25, 12, 0)) == datetime(2026, 11, 25, 18, 0)


def test_schedule_monday_morning_outside_without_sunday_wrap() -> None:
    s = Schedule(["mon-fri 18:00-08:00"])
    assert not s.contains(datetime(2026, 11, 23, 3, 0))  # Mon 03:00: Sunday has no window
    assert s.contains(datetime(2026, 11, 28, 3, 0))  # Sat 03:00 belongs to Friday's window


def test_schedule_variants() -> None:
    assert Schedule(["22:00-06:00"]).contains(datetime(2026, 11, 25, 23, 0))
    s = Schedule(["Fri-Mon 09:00-10:00,12:00-13:00", "Wednesday 00:00-01:00"])
    assert s.contains(datetime(2026, 11, 29, 12, 30))  # Sun
    assert not s.contains(datetime(2026, 11, 24, 9, 30))  # Tue
    assert s.contains(datetime(2026, 11, 25, 0, 30))
    assert Schedule(["daily 00:00-24:00"]).contains(datetime(2026, 11, 25, 23, 59))
    assert Schedule([]).contains(datetime(2026, 11, 25, 3, 0))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("mon-fri", "expected 'DAYS HH:MM-HH:MM'"),
        ("mon fri 18:00-08:00", "expected 'DAYS HH:MM-HH:MM'"),
        ("", "expected 'DAYS HH:MM-HH:MM'"),
        ("funday 18:00-20:00", "unknown day 'funday'"),
        ("mon,,tue 18:00-20:00", "empty day"),
        ("mon 18:00", "expected a range HH:MM-HH:MM"),
        ("mon 18-20", "expected a time HH:MM"),
        ("mon 25:00-26:00", "not a valid time for a start"),
        ("mon 10:60-11:00", "not a valid time"),
        ("mon 24:00-08:00", "not a valid time for a start"),
        ("mon 08:00-24:30", "not a valid time for an end"),
        ("mon 08:00-08:00", "start equals end"),
        ("mon 00:00-00:00", "start equals end"),
    ],
)
def test_bad_schedules(entry: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        parse_schedule(["sat 10:00-11:00", entry])
    with pytest.raises(ScheduleError, match=r"^\[1\]"):
        parse_schedule(["sat 10:00-11:00", entry])
    with pytest.raises(ConfigError, match="idle.schedule") as info:
        IdlePolicy(IdleConfig(schedule=["sat 10:00-11:00", entry]), Fake().probes())
    assert info.value.key == "idle.schedule"


def test_schedule_not_a_string() -> None:
    with pytest.raises(ScheduleError, match="expected a string"):
        parse_schedule([42])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="expected a list of strings"):
        IdlePolicy(IdleConfig(schedule="mon 10:00-11:00"), Fake().probes())  # type: ignore[arg-type]


def test_schedule_rule_holds_outside() -> None:
    fake = Fake()  # Wednesday noon
    v = warm(make(fake, schedule=["mon-fri 18:00-08:00"]), fake)
    assert (v.allowed, v.rule) == (False, "schedule")
    assert "next window starts Wed 18:00" in v.reason
    fake.now = datetime(2026, 11, 25, 19, 0).timestamp()
    assert warm(make(fake, schedule=["mon-fri 18:00-08:00"]), fake).allowed


# --- pause


def test_pause_and_resume() -> None:
    fake = Fake()
    policy = make(fake)
    warm(policy, fake)
    policy.pause(2)
    v = policy.evaluate()
    assert (v.allowed, v.rule) == (False, "paused") and "2h00m left" in v.reason
    fake.tick(3600)
    assert "1h00m left" in policy.evaluate().reason
    fake.tick(3601)
    assert policy.evaluate().allowed and policy.paused_until is None
    policy.pause(0.5)
    assert policy.evaluate().rule == "paused"
    policy.resume()
    assert policy.evaluate().allowed


@pytest.mark.parametrize("hours", [0, -1, math.inf, math.nan, 24 * 365 + 1, "2", True])
def test_bad_pause(hours: object) -> None:
    fake = Fake()
    policy = make(fake)
    with pytest.raises(ValueError, match="pause: expected"):
        policy.pause(hours)  # type: ignore[arg-type]
    assert policy.paused_until is None
    with pytest.raises(ValueError, match="pause: expected"):
        AlwaysIdle().pause(hours)  # type: ignore[arg-type]


def test_paused_wins_over_other_rules() -> None:
    fake = Fake()
    fake.battery = BatteryReading(10.0, False)
    policy = make(fake, schedule=["sun 00:00-01:00"])
    policy.pause(1)
    assert policy.evaluate().rule == "paused"
    policy.resume()
    assert policy.evaluate().rule == "schedule"


# --- config, on_busy, threads


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("on_busy", "explode", "expected one of suspend, leave"),
        ("user_idle_minutes", -1.0, "minutes >= 0"),
        ("max_other_cpu_percent", 150.0, "percentage 0..100"),
        ("battery_resume_percent", -5.0, "percentage 0..100"),
        ("cpu_window_seconds", 0.0, "seconds > 0"),
        ("tf_threads", 0, "integer >= 1"),
    ],
)
def test_bad_idle_config(field: str, value: object, message: str) -> None:
    cfg = IdleConfig()
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=message) as info:
        IdlePolicy(cfg, Fake().probes(), source="crowdd.toml")
    assert info.value.key == f"idle.{field}" and info.value.source == "crowdd.toml"


def test_on_busy_and_threads_reported() -> None:
    fake = Fake()
    fake.user = UserIdle(0.0, "logind: session 3 is in use")
    policy = make(fake, on_busy="leave", tf_threads=10_000)
    v = warm(policy, fake)
    assert v.on_busy == "leave" and v.to_dict()["on_busy"] == "leave"
    assert policy.on_busy == "leave"
    assert policy.tf_threads == (os.cpu_count() or 1)
    assert thread_env(3)["TF_NUM_INTRAOP_THREADS"] == "3"
    assert thread_env(3)["OMP_NUM_THREADS"] == "3"


def test_reconfigure_keeps_pause_and_rejects_bad() -> None:
    fake = Fake()
    policy = make(fake)
    policy.pause(1)
    policy.reconfigure(IdleConfig(on_busy="leave"))
    assert policy.evaluate().rule == "paused" and policy.on_busy == "leave"
    with pytest.raises(ConfigError):
        policy.reconfigure(IdleConfig(schedule=["nope"]))
    assert policy.on_busy == "leave"  # the old settings stay


def test_always_idle() -> None:
    now = [1000.0]
    p = AlwaysIdle(clock=lambda: now[0])
    assert p.evaluate() == Verdict(True, None, "idle policy off: always donate")
    p.pause(1)
    assert p.evaluate().rule == "paused"
    now[0] += 3601
    assert p.evaluate().allowed
    p.pause(1)
    p.resume()
    assert p.evaluate().allowed


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


# --- JobSuspender on real processes


@pytest.fixture
def job_tree() -> Iterator[subprocess.Popen[bytes]]:
    code = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(0.05)'])\n"
        "print(c.pid, flush=True)\n"
        "while True: time.sleep(0.05)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
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

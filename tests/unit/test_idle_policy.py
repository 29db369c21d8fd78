"""The idle policy: each rule driven by injected probes, pause, settings, AlwaysIdle."""

from __future__ import annotations

import math
import os
from datetime import datetime

import pytest

from crowdd.config import ConfigError, IdleConfig
from crowdd.idle.policy import AlwaysIdle, IdlePolicy, Verdict
from crowdd.idle.probes import BatteryReading, CpuReading, Probes, UserIdle

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


def test_a_sudden_busy_second_holds_at_once_and_quiet_for_a_window_releases() -> None:
    """Evaluated every second (as the daemon does while it works): one busy second holds at once,
    whatever the long window's average; release only after a whole window of quiet seconds."""
    fake = Fake()
    policy = make(fake, max_other_cpu_percent=30.0, cpu_window_seconds=10.0)
    policy.evaluate()
    for _ in range(30):  # a quiet half minute
        fake.tick(1)
        assert policy.evaluate().allowed
    fake.tick(1, other_cpu_seconds=1.6)  # 1.6 cpu-s in 1 s on 2 cpus = 80 %
    v = policy.evaluate()
    assert (v.allowed, v.rule) == (False, "cpu") and "80% CPU (limit 30%) over 1s" in v.reason
    for i in range(1, 10):  # quiet again, but not for a whole window yet: no flapping
        fake.tick(1)
        v = policy.evaluate()
        assert (v.allowed, v.rule) == (False, "cpu"), i
        assert f"more than 30% CPU {i}s ago (now 0%)" in v.reason and "stay under it for 10s" in v.reason
    fake.tick(1)
    assert policy.evaluate().allowed  # ten quiet seconds


def test_busy_again_while_waiting_restarts_the_quiet_window() -> None:
    fake = Fake()
    policy = make(fake, max_other_cpu_percent=30.0, cpu_window_seconds=5.0)
    warm(policy, fake)
    fake.tick(1, other_cpu_seconds=2.0)
    assert not policy.evaluate().allowed
    for _ in range(3):
        fake.tick(1)
        policy.evaluate()
    fake.tick(1, other_cpu_seconds=0.8)  # 40 %: busy again
    assert not policy.evaluate().allowed
    for _ in range(4):
        fake.tick(1)
        assert not policy.evaluate().allowed
    fake.tick(1)
    assert policy.evaluate().allowed


def test_light_load_under_the_limit_never_holds() -> None:
    fake = Fake()
    policy = make(fake, max_other_cpu_percent=30.0)
    warm(policy, fake)
    for _ in range(20):
        fake.tick(1, other_cpu_seconds=0.5)  # 25 %
        v = policy.evaluate()
        assert v.allowed and "other CPU 25% <= 30%" in v.reason


def test_readings_closer_than_the_minimum_span_are_measured_from_an_older_one() -> None:
    """An extra evaluation right after another (a pause or resume asks at once) does not make a
    tiny stretch out of a blip: it is measured back to a reading at least MIN_CPU_SPAN old."""
    fake = Fake()
    policy = make(fake, max_other_cpu_percent=30.0)
    warm(policy, fake)
    fake.tick(1)
    policy.evaluate()
    fake.tick(0.01, other_cpu_seconds=0.01)  # 50 % over 10 ms, but 0.5 % over the last second
    v = policy.evaluate()
    assert v.allowed and "other CPU 0% <= 30%" in v.reason


def test_cpu_sampled_while_another_rule_holds() -> None:
    fake = Fake()
    policy = make(fake)
    policy.pause(1)
    policy.evaluate()
    fake.tick(10)
    policy.evaluate()
    policy.resume()
    assert policy.evaluate().allowed  # the window was already started


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


# --- schedule rule


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
